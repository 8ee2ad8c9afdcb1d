"""Elastic training of the embedded SmolLM2-135M-Instruct on the built-in corpus (evidence
for docs/training.md): perplexity at budgets 1.0/0.75/0.5/0.25 on held-out text before and
after, with the tokens and wall time used.

    PYTHONPATH=. python benchmarks/train_smollm2.py --out runs/train_smollm2 --steps 60 --lr 1e-4

Steps: load the GGUF -> convert (importance on built-in calibration text, permute) ->
perplexity of the untrained nested model -> time one full and one budget-0.5 training
step -> train for the number of steps that fits --minutes (or --steps) -> perplexity
again.  (benchmarks/bench_train.py measures the step cost per budget on its own.)  Writes OUT/results.json,
OUT/metrics.jsonl, OUT/metrics.png and OUT/checkpoints/.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flextron.conversion.ranking import convert
from flextron.data.blocks import load_blocks
from flextron.eval.perplexity import archs_for_budgets, evaluate_archs, format_table
from flextron.model.loading import load_default
from flextron.model.objectives import distillation_loss
from flextron.timing import Staged, times_ms
from flextron.train import TrainConfig, load_train_data, train

BUDGETS = [1.0, 0.75, 0.5, 0.25]


def training_step(student, teacher, blocks: torch.Tensor, budget: float) -> Staged:
    """One training micro-batch (teacher forward + student forward/backward), timed with the
    student's gradients cleared beforehand (untimed)."""
    arch = student.arch_for_budget(budget)
    inputs, targets = blocks[:, :-1], blocks[:, 1:]

    def step() -> None:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        loss, _ = distillation_loss(student(inputs, arch), teacher_logits, targets)
        loss.backward()

    def prepare() -> Callable[[], None]:
        student.zero_grad(set_to_none=True)
        return step

    return Staged(prepare)


def steps_that_fit(
    model, teacher, probe: torch.Tensor, args: argparse.Namespace, say: Callable[[str], None]
) -> int:
    """Training steps that fit --minutes, from one full and one budget-0.5 micro-batch on probe
    (batch, seq_len + 1), each the best of 2 timed round-robin."""
    steps_ms = times_ms(
        {b: training_step(model, teacher, probe, b) for b in (1.0, 0.5)},
        torch.device("cpu"),
        repeats=2,
        warmup=0,
        statistic="min",
    )
    model.zero_grad(set_to_none=True)  # the timed steps' gradients do not reach training
    costs = [ms / 1e3 for ms in steps_ms.values()]
    say(
        f"one micro-batch ({args.batch_size} x {args.seq_len} tokens): full {costs[0]:.1f}s, "
        f"budget 0.5 {costs[1]:.1f}s"
    )
    # Budget sampling (full 1/3, else 0.25 / 0.5 / 0.75) costs about their mean per step.
    return max(1, int(args.minutes * 60 / (0.5 * sum(costs))))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/train_smollm2")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training block")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=None, help="default: what fits --minutes")
    parser.add_argument("--minutes", type=float, default=55.0, help="wall-time budget of the training loop")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration blocks of 256 tokens")
    parser.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks of 256 tokens")
    parser.add_argument("--train-embeddings", action="store_true", help="also train the tied embedding")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clock = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - clock:7.1f}s] {message}", flush=True)

    model = load_default()
    tokenizer = model.tokenizer
    calibration = load_blocks(tokenizer, "builtin", 256, args.calib_samples, split="train")
    convert(model, calibration, progress=False)
    say(f"converted on {calibration.numel()} calibration tokens")
    teacher = copy.deepcopy(model).eval().requires_grad_(False)

    held_out = load_blocks(tokenizer, "builtin", 256, args.eval_blocks, split="eval")
    before = evaluate_archs(model, held_out, archs_for_budgets(model, BUDGETS), progress=False)
    say(f"before training, {held_out.numel()} held-out tokens:\n{format_table(before)}")

    data = load_train_data(tokenizer, "builtin", block_size=args.seq_len + 1, max_val_blocks=2)
    steps = args.steps
    if steps is None:
        steps = steps_that_fit(model, teacher, data.train[: args.batch_size], args, say)
    config = TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=max(1, steps // 20),
        train_embeddings=args.train_embeddings,
        eval_every=max(1, steps // 4),
        save_every=max(1, steps // 4),
        eval_batch_size=2,
    )
    say(f"training {steps} steps: {json.dumps(config.to_dict())}")
    result = train(model, teacher, data, config, out)
    say(f"trained {result['tokens']} tokens in {result['seconds']:.0f}s")

    after = evaluate_archs(model, held_out, archs_for_budgets(model, BUDGETS), progress=False)
    say(f"after training:\n{format_table(after)}")
    summary = {
        "config": config.to_dict(),
        "seq_len": args.seq_len,
        "train_tokens": result["tokens"],
        "train_seconds": result["seconds"],
        "total_seconds": time.perf_counter() - clock,
        "held_out_tokens": held_out.numel(),
        "perplexity": {
            f"{b:g}": {
                "before": rb["perplexity"],
                "after": ra["perplexity"],
                "change": ra["perplexity"] / rb["perplexity"] - 1,
            }
            for b, rb, ra in zip(BUDGETS, before, after, strict=True)
        },
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(json.dumps(summary["perplexity"], indent=2))


if __name__ == "__main__":
    main()
