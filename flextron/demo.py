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
from pathlib import Path

import torch

from flextron.budget_search import choose_budget_configs
from flextron.checkpoint import save_pretrained
from flextron.convert import convert
from flextron.data import load_blocks
from flextron.evaluate import archs_for_budgets, evaluate_archs, format_table, write_results
from flextron.generate import generate_text
from flextron.loading import load_default

CALIB_SEQ_LEN = EVAL_SEQ_LEN = 256
BUDGET_SAMPLES = 8  # calibration blocks that choose each budget's configuration
MIN_NEW_TOKENS = 4  # untrained small budgets tend to answer with EOS at once: show what they say


def run_demo(
    out: Path,
    budgets: list[float],
    calib_samples: int = 16,
    eval_blocks: int = 12,
    prompt: str = "What is the capital of France? Answer in one sentence.",
    max_new_tokens: int = 40,
    train_steps: int = 0,
    corpus: Path | None = None,
) -> list[dict]:
    """Run the demo, writing out/model, out/results.json and out/perplexity.png; returns the rows.

    train_steps > 0 adds an elastic-training phase (trained once, then cached; see
    flextron.train.demo_training) and writes out/results_trained.json and out/perplexity_trained.png.
    corpus: a directory from `flextron corpus` (calibration and training on its train/ text,
    perplexity on its heldout/ text); None: the built-in Python documentation.
    """
    train_text, held_out_text = (
        ("builtin", "builtin") if corpus is None else (corpus / "train", corpus / "heldout")
    )
    start = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    torch.manual_seed(0)
    step("loading the embedded SmolLM2-135M-Instruct (GGUF, dequantized to fp32)")
    model = load_default()
    step(
        f"{model.num_parameters() / 1e6:.1f}M parameters, {model.config.num_layers} layers; converting on "
        f"{calib_samples} x {CALIB_SEQ_LEN} calibration tokens of {train_text}"
    )
    calibration = load_blocks(model.tokenizer, train_text, CALIB_SEQ_LEN, calib_samples, split="train")
    convert(model, calibration, batch_size=4)
    step("choosing each budget's configuration by calibration loss (flextron.budget_configs)")
    model.budget_configs = choose_budget_configs(
        model, calibration[:BUDGET_SAMPLES], [b for b in budgets if b < 1], source=str(train_text)
    )
    save_pretrained(model, out / "model")
    step(f"saved the converted model to {out / 'model'}")

    held_out = load_blocks(model.tokenizer, held_out_text, EVAL_SEQ_LEN, eval_blocks, split="eval")
    step(f"perplexity on {held_out.numel()} held-out tokens at budgets {budgets}")
    rows = evaluate_archs(model, held_out, archs_for_budgets(model, budgets), batch_size=4)
    print(format_table(rows))
    write_results(rows, out / "results.json", out / "perplexity.png", "SmolLM2-135M converted (no training)")
    step(f"wrote {out / 'results.json'} and {out / 'perplexity.png'}")

    if train_steps:
        from flextron.train.demo_training import elastic_phase

        step(f"elastic training, {train_steps} steps (distillation from the frozen converted model)")
        model, checkpoint, cached = elastic_phase(model, train_steps, str(train_text))
        step(f"{'loaded the cached' if cached else 'trained and cached the'} checkpoint {checkpoint}")
        rows = evaluate_archs(model, held_out, archs_for_budgets(model, budgets), batch_size=4)
        print(format_table(rows))
        write_results(
            rows,
            out / "results_trained.json",
            out / "perplexity_trained.png",
            f"SmolLM2-135M after {train_steps} elastic-training steps",
        )

    for budget in (max(budgets), sorted(budgets)[len(budgets) // 2]):
        print(f"\n> {prompt}\n[budget {budget:g}] ", end="", flush=True)
        generate_text(
            model,
            prompt,
            model.arch_for_budget(budget),
            max_new_tokens,
            on_text=lambda piece: print(piece, end="", flush=True),
            min_new_tokens=MIN_NEW_TOKENS,
        )
        print()
    step("done")
    if not train_steps:
        print(
            "Without elastic training, smaller budgets lose quality; `flextron train` recovers it.",
            file=sys.stderr,
        )
    return rows
