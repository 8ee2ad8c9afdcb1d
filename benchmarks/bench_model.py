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

from flextron.config import ArchConfig
from flextron.loading import load_model
from flextron.model import FlextronModel
from flextron.speed import (
    CLOCKS,
    best_time,
    clock_function,
    decode_seconds,
    elapsed,
    hf_decode_seconds,
    hf_generate_seconds,
    hf_twin,
)


def layers_times(
    model: FlextronModel,
    prompt: torch.Tensor,
    archs: list[ArchConfig],
    repeats: int,
    now: Callable[[], float],
) -> list[float]:
    """Best seconds of the decoder layers alone over the prompt, per configuration; the
    configurations are timed round-robin, so that load changes hit each alike."""
    x = model.embed_tokens(prompt)  # (1, T, D)
    cos, sin = model.rotary(torch.arange(prompt.shape[1]), x.dtype)

    def run(arch: ArchConfig) -> None:
        h = x
        for index, layer in enumerate(model.layers):
            h = layer(h, cos, sin, arch.mlp_widths[index], arch.heads[index], None, index)

    for arch in archs:
        run(arch)  # warm-up
    times = [[elapsed(lambda arch=arch: run(arch), now) for arch in archs] for _ in range(repeats)]
    return [min(column) for column in zip(*times, strict=True)]


def main() -> None:
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
        now = clock_function(args.clock)
    except ValueError as error:
        parser.error(str(error))
    torch.manual_seed(0)

    model = load_model(args.model)
    hf = hf_twin(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
    results: dict = {
        "model": args.model,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__,
        "cpu": platform.processor(),
        "rows": [],
    }
    with torch.no_grad():
        diff = (model(prompt[:, :64]) - hf(prompt[:, :64]).logits).abs().max().item()
        print(f"same function check: max |logit diff| = {diff:.2e}", file=sys.stderr)
        full = model.full_arch()

        def hf_prefill_run():
            return hf(prompt, logits_to_keep=1)

        def full_prefill_run():
            return model(prompt, full, last_only=True)

        hf_prefill_run(), full_prefill_run()  # warm-up
        hf_prefill_times, full_prefill_times = [], []
        loop_times, gen_times, full_decode_times = [], [], []
        for _ in range(args.repeats):  # round-robin: HF and Flextron full width alike
            hf_prefill_times.append(elapsed(hf_prefill_run, now))
            full_prefill_times.append(elapsed(full_prefill_run, now))
            loop_times.append(hf_decode_seconds(hf, prompt, args.new_tokens, now))
            gen_times.append(hf_generate_seconds(hf, prompt, args.new_tokens, now))
            full_decode_times.append(decode_seconds(model, prompt, full, args.new_tokens, now))
        hf_prefill = min(hf_prefill_times)
        hf_loop, hf_gen = statistics.median(loop_times), statistics.median(gen_times)
        hf_gen_decode = max(hf_gen - hf_prefill, 1e-9)
        results["hf"] = {
            "prefill_tokens_per_s": args.prompt_len / hf_prefill,
            "decode_tokens_per_s_forward_loop": args.new_tokens / hf_loop,
            "decode_tokens_per_s_generate": args.new_tokens / hf_gen_decode,
        }
        budgets = [1.0] + [float(b) for b in args.budgets.split(",") if b]
        archs = [model.arch_for_budget(budget) for budget in budgets]
        layers = layers_times(model, prompt, archs, args.repeats, now)
        for budget, arch, layer_seconds in zip(budgets, archs, layers, strict=True):
            if budget == 1.0:
                prefill = min(full_prefill_times)
            else:
                prefill = best_time(lambda arch=arch: model(prompt, arch, last_only=True), args.repeats, now)
            decode = statistics.median(
                full_decode_times
                if budget == 1.0
                else [decode_seconds(model, prompt, arch, args.new_tokens, now) for _ in range(args.repeats)]
            )
            results["rows"].append(
                {
                    "budget": budget,
                    "arch": [arch.mlp_widths[0], arch.heads[0]],
                    "parameters": model.num_parameters(arch),
                    "prefill_tokens_per_s": args.prompt_len / prefill,
                    "decode_tokens_per_s": args.new_tokens / decode,
                    "layers_ms": 1e3 * layer_seconds,
                    "layers_vs_full": layer_seconds / layers[0],
                }
            )

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
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
