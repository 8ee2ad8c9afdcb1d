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

GEMM rate: fp32 torch.mm-equivalent products (x @ W^T) of the model's own shapes at this
micro-batch — one full forward's worth of projections, MLP and LM head — timed right before
and right after the training, same threads; the ratio uses their mean.
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


def gemm_rate(config: ModelConfig, tokens: int, repeats: int = 2) -> float:
    """GFLOP/s of fp32 x @ W^T over one full forward's GEMM shapes at `tokens` rows."""
    d, f, q, kv = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads * config.head_dim,
        (config.num_kv_heads * config.head_dim),
    )
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)] * config.num_layers
    shapes.append((d, config.vocab_size))
    operands = {(i, o): (torch.randn(tokens, i), torch.randn(o, i)) for i, o in set(shapes)}

    def forward_gemms() -> None:
        for shape in shapes:
            x, w = operands[shape]
            x @ w.T

    # One warm-up pass, then the mean of `repeats` passes (one sample of `repeats` calls).
    ms = times_ms({"gemms": forward_gemms}, torch.device("cpu"), repeats=1, warmup=1, calls=repeats)["gemms"]
    return sum(2 * tokens * i * o for i, o in shapes) / ms / 1e6


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
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is a warm-up)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

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
    )
    data = load_train_data(student.tokenizer, "builtin", args.seq_len + 1)
    data = TrainData(data.train, data.val[:0])  # no validation: only the steps
    tokens = args.batch_size * args.seq_len
    gemm_before = gemm_rate(student.config, tokens)
    with tempfile.TemporaryDirectory() as out:
        train(student, teacher, data, config, out, progress=False)
        records = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]
    gemm_after = gemm_rate(student.config, tokens)
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
        "model": str(args.model),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "accumulation_steps": acc,
        "p_full": args.p_full,
        "train_embeddings": args.train_embeddings,
        "threads": torch.get_num_threads(),
        "timed_steps": len(steps),
        "tokens_per_second": tokens * acc * len(steps) / seconds,
        "gflop_per_second": gflops,
        "gemm_gflop_per_second": gemm,
        "gemm_before_after": [gemm_before, gemm_after],
        "ratio_to_gemm": gflops / gemm,
        "median_step_seconds": statistics.median(s["seconds"] for s in steps),
        "steps": steps,
    }
    print(
        f"{result['tokens_per_second']:.1f} tokens/s, {gflops:.1f} GFLOP/s = {gflops / gemm:.0%} of the "
        f"GEMM rate {gemm:.1f} GFLOP/s (before {gemm_before:.1f}, after {gemm_after:.1f}); "
        f"{len(steps)} steps of {tokens * acc} tokens, {torch.get_num_threads()} threads"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
