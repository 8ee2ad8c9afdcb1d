"""int8 weights against fp32, per budget, through Flextron and through llama.cpp.

    make corpus
    PYTHONPATH=. python benchmarks/bench_int8_quality.py --model runs/recipe/train/checkpoints/step-000600

On `--blocks` x `--seq-len` tokens of the corpus's test split (an equal share per genre), each
budget's perplexity four ways:
  flextron fp32 / int8    the model, and its int8 copy (`--dtype int8`: per-row scales,
                          flextron.model.quantization), run by flextron
  llama.cpp f32 / q8_0    the budget's `flextron export --format gguf --gguf-type f32 | q8_0`, run
                          by llama.cpp (an implementation this project did not write); the q8_0
                          export holds the int8 model's numbers, with llama.cpp's own kernels
                          (activations quantized to int8 per 32 values)
and the int8 / fp32 ratio of each, with the paired per-block standard error of its log.
Target (issue 29): int8 within 1% of fp32 at every budget.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_quality import export_cli, flextron_losses, llama_cpp_losses, split_blocks

from flextron.model.checkpoint import load_pretrained
from flextron.model.quantization import quantize_int8_


def ratio(int8: torch.Tensor, fp32: torch.Tensor) -> dict[str, float]:
    """int8's perplexity over fp32's, from per-block losses (N,), and the standard error of its log."""
    difference = int8.double() - fp32.double()
    return {
        "ratio": math.exp(float(difference.mean())),
        "log_standard_error": float(difference.std() / len(difference) ** 0.5),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Flextron directory")
    parser.add_argument("--corpus", default="data/general", help="a `flextron corpus` directory")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--budgets", default="1,0.75,0.5,0.25")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", default="benchmarks/results/bench_int8_quality.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {message}", file=sys.stderr, flush=True)

    fp32 = load_pretrained(args.model).eval()
    int8 = quantize_int8_(load_pretrained(args.model)).eval()
    blocks = torch.cat(
        list(split_blocks(fp32.tokenizer, args.corpus, args.split, args.seq_len, args.blocks).values())
    )
    log(f"{args.split}: {blocks.shape[0]} x {blocks.shape[1]} tokens")
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        arch = fp32.arch_for_budget(budget)
        losses = {
            "flextron_fp32": flextron_losses(fp32, blocks, arch),
            "flextron_int8": flextron_losses(int8, blocks, arch),
        }
        with tempfile.TemporaryDirectory() as scratch:
            for gguf_type, key in (("f32", "llama_cpp_f32"), ("q8_0", "llama_cpp_q8_0")):
                out = Path(scratch) / f"{gguf_type}.gguf"
                export_cli(args.model, budget, out, "gguf", "--gguf-type", gguf_type)
                losses[key] = llama_cpp_losses(out, blocks)
        row = {"budget": budget, "parameters": fp32.num_parameters(arch)}
        row |= {key: math.exp(float(value.mean())) for key, value in losses.items()}
        row["flextron_int8_vs_fp32"] = ratio(losses["flextron_int8"], losses["flextron_fp32"])
        row["llama_cpp_q8_0_vs_f32"] = ratio(losses["llama_cpp_q8_0"], losses["llama_cpp_f32"])
        rows.append(row)
        log(
            f"budget {budget:g}: flextron fp32 {row['flextron_fp32']:.2f} int8 {row['flextron_int8']:.2f} "
            f"({row['flextron_int8_vs_fp32']['ratio']:.4f}x); llama.cpp f32 {row['llama_cpp_f32']:.2f} "
            f"q8_0 {row['llama_cpp_q8_0']:.2f} ({row['llama_cpp_q8_0_vs_f32']['ratio']:.4f}x)"
        )
    result = {
        "model": args.model,
        "split": args.split,
        "blocks": list(blocks.shape),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
