"""Throughput of elastic training: tokens/s and achieved GFLOP/s against this machine's GEMM rate.

    flextron convert --model default --out runs/smollm2-flextron
    PYTHONPATH=. python benchmarks/bench_train_throughput.py --model runs/smollm2-flextron \
        --json benchmarks/results/bench_train_throughput.json

Runs the training loop of `flextron train` (flextron.train.train: teacher forward, student
forward + KD loss + backward, gradient clipping, AdamW) for --steps steps on the built-in
corpus, without validation, and reads each step's wall time (`step_seconds` in
metrics.jsonl); the first step is a warm-up and is not counted.

Model FLOPs of a step, per micro-batch of N tokens (sequences of T): the student's forward
(2 N P for the P projection and MLP weights its sampled sub-network uses, 2 N D V for the LM
head, 2 B Hq T (T + 1) hd for the causal attention scores and mixing) and backward (twice
the forward, the LM head once with a frozen embedding), plus the teacher's forward at full
width.  Recomputation is not counted: it is overhead, not model work.

GEMM rate: torch.mm-equivalent products (x @ W^T) of the model's own shapes at this
micro-batch, in the run's dtype — one full forward's worth of projections, MLP and LM head —
timed right before and right after the training, same threads; the ratio uses their mean.

`--dtypes fp32,bf16` measures both, back to back in one process with the same sub-network
draws: bf16 is `flextron train --bf16` (autocast; fp32 parameters and optimizer state), and
the summary gives its tokens/s as a multiple of fp32's next to the bf16/fp32 GEMM-rate ratio.

    PYTHONPATH=. python benchmarks/bench_train_throughput.py --model runs/recipe/converted \
        --batch-size 4 --seq-len 256 --p-full 0.05 --threads 2 --dtypes fp32,bf16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch

from flextron.model.checkpoint import load_pretrained
from flextron.model.config import ArchConfig, ModelConfig
from flextron.timing import times_ms
from flextron.train import TrainConfig, load_train_data, train
from flextron.train.batches import TrainData
from flextron.train.metrics import read_metrics
from flextron.train.trainer import subnet_sampler


def forward_flops(config: ModelConfig, arch: ArchConfig, batch: int, seq: int) -> tuple[float, float]:
    """(FLOPs of the layers' GEMMs and attention, FLOPs of the LM head) of one forward."""
    tokens, d, hd = batch * seq, config.hidden_size, config.head_dim
    layers = 0.0
    for layer, (width, heads) in enumerate(zip(arch.mlp_widths, arch.heads, strict=True)):
        group = config.layer_heads(layer) // config.layer_kv_heads(layer)
        kv_heads = math.ceil(heads / group)  # whole KV groups are computed
        q_dim, kv_dim = kv_heads * group * hd, kv_heads * hd
        weights = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * width
        layers += 2 * tokens * weights + 2 * 2 * batch * heads * hd * seq * (seq + 1) / 2
    return layers, 2 * tokens * d * config.vocab_size


def step_flops(
    config: ModelConfig, archs: list[ArchConfig], batch: int, seq: int, train_embeddings: bool
) -> float:
    """Model FLOPs of one step: per micro-batch, student forward + backward and teacher forward."""
    teacher = sum(forward_flops(config, ArchConfig.full(config), batch, seq))
    total = 0.0
    for arch in archs:
        layers, head = forward_flops(config, arch, batch, seq)
        total += 3 * layers + head * (3 if train_embeddings else 2) + teacher
    return total


def gemm_rate(config: ModelConfig, tokens: int, dtype: torch.dtype, repeats: int = 2) -> float:
    """GFLOP/s of x @ W^T in `dtype` over one full forward's GEMM shapes at `tokens` rows."""
    d, f, q, kv = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads * config.head_dim,
        (config.num_kv_heads * config.head_dim),
    )
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)] * config.num_layers
    shapes.append((d, config.vocab_size))
    operands = {
        (i, o): (torch.randn(tokens, i, dtype=dtype), torch.randn(o, i, dtype=dtype)) for i, o in set(shapes)
    }

    def forward_gemms() -> None:
        for shape in shapes:
            x, w = operands[shape]
            x @ w.T

    # One warm-up pass, then the mean of `repeats` passes (one sample of `repeats` calls).
    ms = times_ms({"gemms": forward_gemms}, torch.device("cpu"), repeats=1, warmup=1, calls=repeats)["gemms"]
    return sum(2 * tokens * i * o for i, o in shapes) / ms / 1e6


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(args: argparse.Namespace, dtype: str) -> dict:
    """Train --steps steps in `dtype` on a fresh copy of the model; the throughput record."""
    student = load_pretrained(args.model)
    teacher = load_pretrained(args.model)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        accumulation_steps=args.accumulation_steps,
        p_full=args.p_full,
        train_embeddings=args.train_embeddings,
        warmup_steps=1,
        save_every=0,
        bf16=dtype == "bf16",
    )
    data = load_train_data(student.tokenizer, "builtin", args.seq_len + 1)
    data = TrainData(data.train, data.val[:0])  # no validation: only the steps
    tokens = args.batch_size * args.seq_len
    gemm_before = gemm_rate(student.config, tokens, DTYPES[dtype])
    with tempfile.TemporaryDirectory() as out:
        train(student, teacher, data, config, out, progress=False)
        records = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]
    gemm_after = gemm_rate(student.config, tokens, DTYPES[dtype])
    gemm = (gemm_before + gemm_after) / 2

    sampler = subnet_sampler(student, config)
    acc = args.accumulation_steps
    steps = []
    for record in records[1:]:  # the first step warms up
        archs = [sampler.sample((record["step"] - 1) * acc + m) for m in range(acc)]
        flops = step_flops(student.config, archs, args.batch_size, args.seq_len, args.train_embeddings)
        steps.append({"seconds": record["step_seconds"], "gflop": flops / 1e9, "archs": record["archs"]})
    seconds = sum(s["seconds"] for s in steps)
    gflops = sum(s["gflop"] for s in steps) / seconds
    result = {
        "dtype": dtype,
        "tokens_per_second": tokens * acc * len(steps) / seconds,
        "gflop_per_second": gflops,
        "gemm_gflop_per_second": gemm,
        "gemm_before_after": [gemm_before, gemm_after],
        "ratio_to_gemm": gflops / gemm,
        "median_step_seconds": statistics.median(s["seconds"] for s in steps),
        "timed_steps": len(steps),
        "steps": steps,
    }
    print(
        f"{dtype}: {result['tokens_per_second']:.1f} tokens/s, {gflops:.1f} GFLOP/s = {gflops / gemm:.0%} of "
        f"the {dtype} GEMM rate {gemm:.1f} GFLOP/s (before {gemm_before:.1f}, after {gemm_after:.1f}); "
        f"{len(steps)} steps of {tokens * acc} tokens, {torch.get_num_threads()} threads",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a Flextron model directory (flextron convert)")
    parser.add_argument("--steps", type=int, default=6, help="steps to run; the first is a warm-up")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--p-full", type=float, default=1 / 3, help="1: every step at full width")
    parser.add_argument("--train-embeddings", action="store_true", help="default: frozen, as in the demo")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--dtypes", default="fp32", help="comma-separated: fp32, bf16 (measured in this order)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is a warm-up)")
    dtypes = args.dtypes.split(",")
    if not dtypes or any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes must list some of {list(DTYPES)}, got {args.dtypes!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runs = {dtype: measure(args, dtype) for dtype in dtypes}
    result = {
        "model": str(args.model),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "accumulation_steps": args.accumulation_steps,
        "p_full": args.p_full,
        "train_embeddings": args.train_embeddings,
        "threads": torch.get_num_threads(),
        "runs": runs,
    }
    if {"fp32", "bf16"} <= set(runs):
        fp32, bf16 = runs["fp32"], runs["bf16"]
        result["bf16_over_fp32"] = {
            "tokens_per_second": bf16["tokens_per_second"] / fp32["tokens_per_second"],
            "gemm_rate": bf16["gemm_gflop_per_second"] / fp32["gemm_gflop_per_second"],
        }
        print(
            f"bf16 / fp32: {result['bf16_over_fp32']['tokens_per_second']:.2f}x tokens/s "
            f"(GEMM rate {result['bf16_over_fp32']['gemm_rate']:.2f}x)"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
