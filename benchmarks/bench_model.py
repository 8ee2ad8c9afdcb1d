"""Model benchmark: Flextron vs Hugging Face transformers' LlamaForCausalLM, same weights, same CPU.

    python benchmarks/bench_model.py                       # SmolLM2-135M (embedded GGUF), fp32
    python benchmarks/bench_model.py --model DIR --threads 2 --json out.json

Measured in one run (prefill: best of --repeats after a warm-up; decode: median; HF and Flextron
at full width timed round-robin, so that load changes on a shared machine hit both alike):
  prefill tokens/s   batch 1 x --prompt-len tokens, logits of the last position (as generation does)
  decode tokens/s    --new-tokens greedy steps after that prompt, with each library's KV cache;
                     HF both through generate() and through a bare forward loop (less overhead)
  layers time        the decoder layers alone (no embedding / LM head) for the prompt, per budget
Flextron runs at full width and at --budgets.  --clock cpu (one thread only) times with the
process's CPU time instead of wall time, for machines whose neighbours' load swamps wall time.
Targets (docs/benchmarks.md): prefill >= 1.0x HF, decode >= 2x HF, layers time at budget 0.5
<= 0.6x full width.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from flextron.eval.speed import hf_generate, hf_prefilled_decode, hf_twin, prefilled_decode
from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel
from flextron.model.loading import load_model
from flextron.timing import CLOCKS, Staged, check_clock, sample_times_ms, times_ms


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budgets", default="0.75,0.5,0.25")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (needs --threads 1)",
    )
    parser.add_argument("--json", default="benchmarks/results/bench_model.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_clock(args.clock, torch.device("cpu"))
    except ValueError as error:
        parser.error(str(error))
    return args


def layer_functions(
    model: FlextronModel, prompt: torch.Tensor, archs: list[ArchConfig]
) -> dict[int, Callable[[], None]]:
    """Per configuration (its index in archs), the decoder layers alone (no embedding or LM head)
    over prompt (1, T)."""
    x = model.embed_tokens(prompt)  # (1, T, D)
    cos, sin = model.rotary(torch.arange(prompt.shape[1]), x.dtype)

    def run(arch: ArchConfig) -> None:
        h = x
        for index, layer in enumerate(model.layers):
            h = layer(h, cos, sin, arch.mlp_widths[index], arch.heads[index], None, index)

    return {i: (lambda arch=arch: run(arch)) for i, arch in enumerate(archs)}


def full_width_ms(
    model: FlextronModel, hf, prompt: torch.Tensor, args: argparse.Namespace
) -> dict[str, float]:
    """Milliseconds of transformers and Flextron at full width, all timed round-robin after a
    warm-up: prefills (best), transformers' decode loop and generate(), Flextron's decode (medians)."""
    full = model.full_arch()
    samples = sample_times_ms(
        {
            "hf_prefill": lambda: hf(prompt, logits_to_keep=1),
            "prefill": lambda: model(prompt, full, last_only=True),
            "hf_loop": Staged(lambda: hf_prefilled_decode(hf, prompt, args.new_tokens)),
            "hf_generate": lambda: hf_generate(hf, prompt, args.new_tokens),
            "decode": Staged(lambda: prefilled_decode(model, prompt, full, args.new_tokens)),
        },
        prompt.device,
        args.repeats,
        1,
        args.clock,
    )
    return {key: (min if key.endswith("prefill") else statistics.median)(ms) for key, ms in samples.items()}


def budget_ms(
    model: FlextronModel, prompt: torch.Tensor, arch: ArchConfig, args: argparse.Namespace
) -> tuple[float, float]:
    """(prefill ms: best after a warm-up, decode ms: median) of Flextron at one configuration."""
    prefill = times_ms(
        {"prefill": lambda: model(prompt, arch, last_only=True)},
        prompt.device,
        args.repeats,
        1,
        args.clock,
        statistic="min",
    )["prefill"]
    decode = times_ms(
        {"decode": Staged(lambda: prefilled_decode(model, prompt, arch, args.new_tokens))},
        prompt.device,
        args.repeats,
        0,
        args.clock,
    )["decode"]
    return prefill, decode


def measure(model: FlextronModel, prompt: torch.Tensor, args: argparse.Namespace) -> dict:
    """The results: transformers' speeds ("hf") and one row per budget (full width first)."""
    hf = hf_twin(model)
    with torch.no_grad():
        diff = (model(prompt[:, :64]) - hf(prompt[:, :64]).logits).abs().max().item()
        print(f"same function check: max |logit diff| = {diff:.2e}", file=sys.stderr)
        full = full_width_ms(model, hf, prompt, args)
        hf_gen_decode = max(full["hf_generate"] - full["hf_prefill"], 1e-6)
        results = {
            "hf": {
                "prefill_tokens_per_s": args.prompt_len * 1e3 / full["hf_prefill"],
                "decode_tokens_per_s_forward_loop": args.new_tokens * 1e3 / full["hf_loop"],
                "decode_tokens_per_s_generate": args.new_tokens * 1e3 / hf_gen_decode,
            },
            "rows": [],
        }
        budgets = [1.0] + [float(b) for b in args.budgets.split(",") if b]
        archs = [model.arch_for_budget(budget) for budget in budgets]
        layers = times_ms(
            layer_functions(model, prompt, archs), prompt.device, args.repeats, 1, args.clock, statistic="min"
        )
        for index, (budget, arch) in enumerate(zip(budgets, archs, strict=True)):
            prefill, decode = (
                (full["prefill"], full["decode"]) if budget == 1.0 else budget_ms(model, prompt, arch, args)
            )
            results["rows"].append(
                {
                    "budget": budget,
                    "arch": [arch.mlp_widths[0], arch.heads[0]],
                    "parameters": model.num_parameters(arch),
                    "prefill_tokens_per_s": args.prompt_len * 1e3 / prefill,
                    "decode_tokens_per_s": args.new_tokens * 1e3 / decode,
                    "layers_ms": layers[index],
                    "layers_vs_full": layers[index] / layers[0],
                }
            )
    return results


def print_table(results: dict, args: argparse.Namespace) -> None:
    hf_row = results["hf"]
    print(
        f"\nSmolLM2-class model, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"{results['threads']} threads, fp32, {args.clock} clock"
    )
    print(
        f"HF transformers: prefill {hf_row['prefill_tokens_per_s']:.0f} tok/s, decode "
        f"{hf_row['decode_tokens_per_s_generate']:.1f} tok/s (generate) / "
        f"{hf_row['decode_tokens_per_s_forward_loop']:.1f} tok/s (forward loop)"
    )
    header = (
        f"{'budget':>6} {'MLP,heads':>10} {'params M':>8} {'prefill t/s':>11} {'vs HF':>6} "
        f"{'decode t/s':>10} {'vs HF gen':>9} {'vs HF loop':>10} {'layers ms':>9} {'vs full':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in results["rows"]:
        print(
            f"{row['budget']:>6.2f} {str(tuple(row['arch'])):>10} {row['parameters'] / 1e6:>8.1f} "
            f"{row['prefill_tokens_per_s']:>11.0f} "
            f"{row['prefill_tokens_per_s'] / hf_row['prefill_tokens_per_s']:>5.2f}x "
            f"{row['decode_tokens_per_s']:>10.1f} "
            f"{row['decode_tokens_per_s'] / hf_row['decode_tokens_per_s_generate']:>8.2f}x "
            f"{row['decode_tokens_per_s'] / hf_row['decode_tokens_per_s_forward_loop']:>9.2f}x "
            f"{row['layers_ms']:>9.1f} {row['layers_vs_full']:>6.2f}x"
        )


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model = load_model(args.model)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
    results = {
        "model": args.model,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__,
        "cpu": platform.processor(),
        **measure(model, prompt, args),
    }
    print_table(results, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
