"""`flextron demo`: the embedded SmolLM2-135M-Instruct end to end, in a few minutes on a CPU.

Load the GGUF -> convert (importance on calibration text, permute) -> choose each budget's
configuration by calibration loss -> save -> perplexity at each budget on held-out text
(table, JSON, PNG) -> a short elastic-training phase -> answer a prompt at two budgets.
`make demo` uses the general-English corpus (`make corpus`); without --corpus the text is
the built-in Python documentation.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flextron.conversion.budget_search import choose_budget_configs
from flextron.conversion.layer_sensitivity import sensitivity_cost
from flextron.conversion.ranking import convert
from flextron.data.blocks import evenly_spaced, load_blocks
from flextron.eval.generation import generate_text
from flextron.eval.perplexity import archs_for_budgets, evaluate_archs, format_table, write_results
from flextron.model.budget_configs import CalibrationConfig
from flextron.model.checkpoint import save_pretrained
from flextron.model.config import REPORTED_BUDGETS
from flextron.model.loading import load_default
from flextron.ops.info import bf16_is_fast
from flextron.options import non_negative_int, option, parse_budgets, positive_int
from flextron.train.demo_training import cache_root

EVAL_SEQ_LEN = 256
BUDGET_SAMPLES = 8  # calibration blocks that choose each budget's configuration
# Coarse layer sensitivities for the demo: 4 MLP widths per layer on 1 calibration block
# (`flextron convert`: 8 on 4 blocks), a seventh of the work.  They only propose a per-layer
# configuration, which is then measured beside the uniform ones on all BUDGET_SAMPLES blocks.
COARSE_SENSITIVITY = {"layer_levels": 4, "sensitivity_blocks": 1}
MIN_NEW_TOKENS = 4  # untrained small budgets tend to answer with EOS at once: show what they say


@dataclass
class DemoConfig:
    """Settings of the demo; the fields are `flextron demo`'s options."""

    budgets: tuple[float, ...] = option(REPORTED_BUDGETS, "budgets to measure", type=parse_budgets)
    calib_samples: int = option(16, "calibration blocks", type=positive_int)
    eval_blocks: int = option(12, "held-out blocks of 256 tokens", type=positive_int)
    prompt: str = option("What is the capital of France? Answer in one sentence.", "the prompt answered")
    max_new_tokens: int = option(40, "tokens of each answer", type=positive_int)
    train_steps: int = option(
        40, "elastic-training steps, trained once, cached (0: none)", type=non_negative_int
    )
    corpus: str | None = option(
        None,
        "a `flextron corpus` directory: calibrate and train on its train/ text, measure on test/ "
        "(default: the built-in Python documentation)",
    )

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("DemoConfig.budgets must list at least one budget")
        if self.corpus is not None and not (Path(self.corpus) / "corpus.json").is_file():
            raise ValueError(f"--corpus {self.corpus}: not a corpus directory (build one with `make corpus`)")


def run_demo(out: Path, config: DemoConfig) -> list[dict]:
    """Run the demo, writing out/model, out/results.json and out/perplexity.png; returns the rows.

    config.train_steps > 0 adds an elastic-training phase (trained once, then cached; see
    flextron.train.demo_training) and writes out/results_trained.json and out/perplexity_trained.png.
    config.corpus: a directory from `flextron corpus` (calibration and training on its train/
    text, perplexity on its test/ text); None: the built-in Python documentation.
    """
    corpus = None if config.corpus is None else Path(config.corpus)
    train_text, held_out_text = (
        ("builtin", "builtin") if corpus is None else (corpus / "train", corpus / "test")
    )
    start = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    torch.manual_seed(0)
    step("loading the embedded SmolLM2-135M-Instruct (GGUF, dequantized to fp32)")
    model = load_default()
    step(
        f"{model.num_parameters() / 1e6:.1f}M parameters, {model.config.num_layers} layers; converting on "
        f"{config.calib_samples} x {CalibrationConfig.seq_len} calibration tokens of {train_text}"
    )
    _convert(model, config, train_text, step)
    save_pretrained(model, out / "model")
    step(f"saved the converted model to {out / 'model'}")

    held_out = load_blocks(model.tokenizer, held_out_text, EVAL_SEQ_LEN, config.eval_blocks, split="eval")
    step(f"perplexity on {held_out.numel()} held-out tokens at budgets {list(config.budgets)}")
    rows = evaluate_archs(model, held_out, archs_for_budgets(model, config.budgets), batch_size=4)
    print(format_table(rows))
    write_results(rows, out / "results.json", out / "perplexity.png", "SmolLM2-135M converted (no training)")
    step(f"wrote {out / 'results.json'} and {out / 'perplexity.png'}")

    if config.train_steps:
        from flextron.train.demo_training import elastic_phase

        step(
            f"elastic training, {config.train_steps} steps (distillation from the frozen converted model). "
            "Slow the first time, as each step runs the teacher and a sampled budget forward and back; "
            "trained once, then loaded from the cache"
        )
        model, checkpoint, cached = elastic_phase(model, config.train_steps, str(train_text))
        step(f"{'loaded the cached' if cached else 'trained and cached the'} checkpoint {checkpoint}")
        rows = evaluate_archs(model, held_out, archs_for_budgets(model, config.budgets), batch_size=4)
        print(format_table(rows))
        write_results(
            rows,
            out / "results_trained.json",
            out / "perplexity_trained.png",
            f"SmolLM2-135M after {config.train_steps} elastic-training steps",
        )
    _answer(model, config)
    step("done")
    if not config.train_steps:
        print(
            "Without elastic training, smaller budgets lose quality; `flextron train` recovers it.",
            file=sys.stderr,
        )
    return rows


def _convert(model, config: DemoConfig, train_text: str | Path, step: Callable[[str], None]) -> None:
    """Convert the model on calibration text and choose each budget's configuration on it."""
    calibration = CalibrationConfig(
        budgets=tuple(b for b in config.budgets if b < 1), bf16=bf16_is_fast(), **COARSE_SENSITIVITY
    )
    blocks = load_blocks(
        model.tokenizer, train_text, calibration.seq_len, config.calib_samples, split="train"
    )
    convert(model, blocks, calibration)
    passes = sensitivity_cost(model.config, calibration.layer_levels) * calibration.sensitivity_blocks
    step(
        "choosing each budget's configuration by calibration loss (flextron.model.budget_configs). The slow "
        f"step: coarse layer sensitivities first, each layer narrowed alone to {calibration.layer_levels} "
        f"MLP widths and fewer heads, which costs about {passes:.0f} forward passes over a block"
        f"{' in bf16' if calibration.bf16 else ''} (measured once per model and text, then kept in "
        f"{cache_root()})"
    )
    model.budget_configs = choose_budget_configs(
        model,
        evenly_spaced(blocks, BUDGET_SAMPLES),
        calibration,
        source=str(train_text),
        sensitivity_cache=cache_root(),
    )


def _answer(model, config: DemoConfig) -> None:
    """Stream the answer to config.prompt at the largest and the middle budget."""
    budgets = config.budgets
    for budget in (max(budgets), sorted(budgets)[len(budgets) // 2]):
        print(f"\n> {config.prompt}\n[budget {budget:g}] ", end="", flush=True)
        generate_text(
            model,
            config.prompt,
            model.arch_for_budget(budget),
            max_new_tokens=config.max_new_tokens,
            on_text=lambda piece: print(piece, end="", flush=True),
            min_new_tokens=MIN_NEW_TOKENS,
        )
        print()
