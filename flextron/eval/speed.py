"""Speed of a model at several budgets: prefill and decode tokens/s, optionally against
Hugging Face transformers' LlamaForCausalLM holding the same weights.

Used by `flextron bench` and benchmarks/bench_model.py, timed with flextron.timing (round-robin,
CUDA-synchronised): prefill is the best of `repeats` runs after a warm-up, decode the median of
`repeats` runs, each after an untimed prefill.  `clock` "wall" is elapsed time, "cpu" this
process's CPU time (CPU, one thread only), which on a shared machine measures the model rather
than its neighbours.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from flextron.eval.generation import stream_tokens
from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel
from flextron.timing import Staged, check_clock, times_ms


def prefilled_decode(
    model: FlextronModel, prompt: torch.Tensor, arch: ArchConfig, new_tokens: int
) -> Callable[[], None]:
    """Runs the prefill of prompt (1, T) and its first token; returns the call that makes the
    `new_tokens` greedy steps after it (KV cache), the part a decode timing measures."""
    tokens = stream_tokens(model, prompt[0], arch, max_new_tokens=new_tokens + 1)
    next(tokens)  # the prefill and the first token
    return lambda: collections.deque(tokens, maxlen=0)  # exhausts the stream


def hf_twin(model: FlextronModel):
    """transformers' class of the model's family (LlamaForCausalLM, ...; its default attention)
    holding the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from flextron.model.slicing import hf_state_dict

    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model.config.to_hf())).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weights do not map onto transformers: {missing[:3]} {unexpected[:3]}")
    hf.tie_weights()
    return hf


@torch.inference_mode()  # as Flextron's generation runs: the leanest loop transformers allows
def hf_prefilled_decode(hf, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """Runs transformers' prefill of prompt (1, T) into a DynamicCache; returns the call that makes
    `new_tokens` greedy steps with a bare forward loop over that cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    token = hf(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    @torch.inference_mode()
    def decode() -> None:
        nonlocal token
        for _ in range(new_tokens):
            token = hf(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)

    return decode


def hf_generate(hf, prompt: torch.Tensor, new_tokens: int) -> None:
    """transformers' generate(): prefill + `new_tokens` greedy steps (a timing of it includes the
    prefill, which the caller subtracts)."""
    hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


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
    *,
    compare_hf: bool = False,
    seed: int = 0,
) -> list[SpeedRow]:
    """Prefill (batch 1 x prompt_len, last-position logits) and greedy decode tokens/s per budget.

    compare_hf adds a "transformers" row (same weights, full width; decode through a forward
    loop over its DynamicCache), timed round-robin with the full-width Flextron prefill and decode.
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
    device = model.embed_tokens.weight.device
    check_clock(clock, device)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=generator).to(device)
    hf = hf_twin(model) if compare_hf else None
    rows = []
    # inference_mode, as generation runs: under no_grad each custom-op call also passes autograd.
    with torch.inference_mode():
        for budget in budgets:
            arch = model.arch_for_budget(budget)
            prefill = {"flextron": lambda arch=arch: model(prompt, arch, last_only=True)}
            decode = {"flextron": Staged(lambda arch=arch: prefilled_decode(model, prompt, arch, new_tokens))}
            if hf is not None and budget == 1.0:  # timed round-robin with the full-width Flextron
                prefill["transformers"] = lambda: hf(prompt, logits_to_keep=1)
                decode["transformers"] = Staged(lambda: hf_prefilled_decode(hf, prompt, new_tokens))
            prefill_ms = times_ms(prefill, device, repeats, 1, clock, statistic="min")
            decode_ms = times_ms(decode, device, repeats, 0, clock)
            for name in prefill:
                rows.append(
                    SpeedRow(
                        f"budget {budget:g}" if name == "flextron" else name,
                        model.num_parameters(arch if name == "flextron" else None),
                        prompt_len * 1e3 / prefill_ms[name],
                        new_tokens * 1e3 / decode_ms[name],
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
