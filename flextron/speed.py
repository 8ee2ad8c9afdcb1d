"""Speed of a model at several budgets: prefill and decode tokens/s, optionally against
Hugging Face transformers' LlamaForCausalLM holding the same weights.

Used by `flextron bench` and benchmarks/bench_model.py.  Timings are the best of `repeats`
runs after a warm-up (prefill) or the median of `repeats` runs (decode); `clock` "wall" is
elapsed time, "cpu" this process's CPU time (one thread only), which on a shared machine
measures the model rather than its neighbours.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from flextron.config import ArchConfig
from flextron.generate import stream_tokens
from flextron.model import FlextronModel

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def clock_function(clock: str) -> Callable[[], float]:
    """The timer for a clock name; ValueError for an unknown clock or "cpu" with several threads."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and torch.get_num_threads() != 1:
        raise ValueError(
            f"clock 'cpu' measures one thread's time, but torch uses {torch.get_num_threads()} "
            "threads: set one thread (--threads 1) or use clock 'wall'"
        )
    return CLOCKS[clock]


def synchronize() -> None:
    """Wait for queued CUDA work (a no-op where CUDA is not in use): CUDA ops return before
    their kernels finish, so a clock read without this measures only the launches."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def elapsed(function: Callable[[], object], now: Callable[[], float]) -> float:
    """Seconds one call of `function` takes, its CUDA work included."""
    synchronize()
    start = now()
    function()
    synchronize()
    return now() - start


def best_time(function: Callable[[], object], repeats: int, now: Callable[[], float]) -> float:
    """Best time of `repeats` runs after one warm-up run (seconds)."""
    function()
    return min(elapsed(function, now) for _ in range(repeats))


def decode_seconds(
    model: FlextronModel, prompt: torch.Tensor, arch: ArchConfig, new_tokens: int, now: Callable[[], float]
) -> float:
    """Seconds for `new_tokens` greedy steps after the prefill of prompt (1, T) (KV cache)."""
    tokens = stream_tokens(model, prompt[0], arch, max_new_tokens=new_tokens + 1)
    next(tokens)  # the prefill and the first token
    start = now()
    for _ in tokens:
        pass
    return now() - start


def hf_twin(model: FlextronModel):
    """transformers' class of the model's family (LlamaForCausalLM, ...; its default attention)
    holding the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from flextron.export import hf_state_dict

    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model.config.to_hf())).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weights do not map onto transformers: {missing[:3]} {unexpected[:3]}")
    hf.tie_weights()
    return hf


@torch.inference_mode()  # as Flextron's generation runs: the leanest loop transformers allows
def hf_decode_seconds(hf, prompt: torch.Tensor, new_tokens: int, now: Callable[[], float]) -> float:
    """Seconds for `new_tokens` greedy steps with a bare forward loop over a DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    out = hf(prompt, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    start = now()
    for _ in range(new_tokens):
        out = hf(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return now() - start


def hf_generate_seconds(hf, prompt: torch.Tensor, new_tokens: int, now: Callable[[], float]) -> float:
    """Seconds for generate(): prefill + decode (the caller subtracts the prefill)."""
    start = now()
    hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return now() - start


@dataclass
class SpeedRow:
    name: str  # "budget 0.5", or "transformers" for the HF twin
    parameters: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def measure_speed(
    model: FlextronModel,
    budgets: list[float],
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    clock: str = "wall",
    compare_hf: bool = False,
    seed: int = 0,
) -> list[SpeedRow]:
    """Prefill (batch 1 x prompt_len, last-position logits) and greedy decode tokens/s per budget.

    compare_hf adds a "transformers" row (same weights, full width; decode through a forward
    loop over its DynamicCache), timed round-robin with the full-width Flextron decode.
    """
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError(
            f"prompt_len, new_tokens and repeats must be >= 1, got {prompt_len}, {new_tokens}, {repeats}"
        )
    if prompt_len + new_tokens + 1 > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt_len {prompt_len} + new_tokens {new_tokens} (+ the first token) does not "
            f"fit the model's context of {model.config.max_position_embeddings}"
        )
    if compare_hf and 1.0 not in budgets:
        raise ValueError("comparing with transformers needs budget 1 (the full model) among the budgets")
    now = clock_function(clock)
    generator = torch.Generator().manual_seed(seed)
    device = model.embed_tokens.weight.device
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=generator).to(device)
    rows = []
    hf = hf_twin(model) if compare_hf else None
    # inference_mode, as generation runs: under no_grad each custom-op call also passes autograd.
    with torch.inference_mode():
        for budget in budgets:
            arch = model.arch_for_budget(budget)
            prefill = best_time(lambda arch=arch: model(prompt, arch, last_only=True), repeats, now)
            decode, hf_decode = [], []
            for _ in range(repeats):  # round-robin, so that load changes hit both alike
                decode.append(decode_seconds(model, prompt, arch, new_tokens, now))
                if hf is not None and budget == 1.0:
                    hf_decode.append(hf_decode_seconds(hf, prompt, new_tokens, now))
            rows.append(
                SpeedRow(
                    f"budget {budget:g}",
                    model.num_parameters(arch),
                    prompt_len / prefill,
                    new_tokens / statistics.median(decode),
                )
            )
            if hf_decode:
                hf_prefill = best_time(lambda: hf(prompt, logits_to_keep=1), repeats, now)
                rows.append(
                    SpeedRow(
                        "transformers",
                        model.num_parameters(),
                        prompt_len / hf_prefill,
                        new_tokens / statistics.median(hf_decode),
                    )
                )
    return rows


def format_speed_table(rows: list[SpeedRow]) -> str:
    """A text table; with a "transformers" row, Flextron's ratios against it."""
    hf = next((row for row in rows if row.name == "transformers"), None)
    header = f"{'':>14} {'params M':>9} {'prefill tok/s':>13} {'decode tok/s':>12}"
    header += f" {'prefill vs HF':>13} {'decode vs HF':>12}" if hf else ""
    lines = [header, "-" * len(header)]
    for row in rows:
        line = (
            f"{row.name:>14} {row.parameters / 1e6:>9.1f} {row.prefill_tokens_per_s:>13.1f} "
            f"{row.decode_tokens_per_s:>12.1f}"
        )
        if hf:
            line += (
                f" {row.prefill_tokens_per_s / hf.prefill_tokens_per_s:>12.2f}x"
                f" {row.decode_tokens_per_s / hf.decode_tokens_per_s:>11.2f}x"
            )
        lines.append(line)
    return "\n".join(lines)


def rows_to_json(rows: list[SpeedRow]) -> list[dict]:
    return [asdict(row) for row in rows]
