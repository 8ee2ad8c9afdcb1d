"""Cost of one elastic-training micro-batch per budget: sliced weights make small budgets cheaper.

    PYTHONPATH=. python benchmarks/bench_train.py --json benchmarks/results/bench_train.json

The model is SmolLM2-135M's architecture (30 layers, d=576, 9 heads / 3 KV, d_ff=1536,
vocab 49152) with random weights: the cost does not depend on the values.  After a warm-up,
each repeat times (flextron.timing), for every budget in turn (interleaved, so machine load
hits all alike), the
student's forward + backward + KD loss against precomputed teacher logits; the median
per budget is reported next to the full model's, with the parameters each budget uses.
A masked implementation would cost the same at every budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from flextron.model.config import ModelConfig
from flextron.model.elastic_model import FlextronModel
from flextron.model.objectives import distillation_loss
from flextron.timing import Staged, sample_times_ms

SMOLLM2 = ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position_embeddings=2048,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def training_step(
    model: FlextronModel, inputs: torch.Tensor, teacher_logits: torch.Tensor, budget: float
) -> Staged:
    """One micro-batch at `budget`: the student's forward + KD loss + backward, timed with its
    gradients cleared beforehand (untimed)."""
    arch = model.arch_for_budget(budget)

    def step() -> None:
        loss, _ = distillation_loss(model(inputs, arch), teacher_logits, inputs)
        loss.backward()

    def prepare() -> Callable[[], None]:
        model.zero_grad(set_to_none=True)
        return step

    return Staged(prepare)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", default="1,0.75,0.5,0.25")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    torch.manual_seed(0)
    model = FlextronModel(SMOLLM2)
    model.rotary = type(model.rotary)(SMOLLM2.head_dim, SMOLLM2.rope_theta, SMOLLM2.rope_scaling)
    model.embed_tokens.weight.requires_grad_(False)  # as in the SmolLM2 run (frozen tied embedding)
    inputs = torch.randint(0, SMOLLM2.vocab_size, (args.batch_size, args.seq_len))
    with torch.no_grad():
        teacher_logits = model(inputs)
    steps = {budget: training_step(model, inputs, teacher_logits, budget) for budget in budgets}
    samples = sample_times_ms(steps, torch.device("cpu"), args.repeats, 1)
    times = {budget: [ms / 1e3 for ms in values] for budget, values in samples.items()}
    full = statistics.median(times[1.0]) if 1.0 in times else None
    rows = []
    print(f"{'budget':>6} {'params (M)':>10} {'median s':>9} {'vs full':>8}")
    for budget in budgets:
        median = statistics.median(times[budget])
        params = model.num_parameters(model.arch_for_budget(budget)) / 1e6
        ratio = median / full if full else float("nan")
        rows.append(
            {
                "budget": budget,
                "parameters_m": params,
                "median_seconds": median,
                "seconds": times[budget],
                "ratio_to_full": ratio,
            }
        )
        print(f"{budget:>6.2f} {params:>10.1f} {median:>9.2f} {ratio:>8.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "tokens_per_micro_batch": args.batch_size * args.seq_len,
                    "threads": torch.get_num_threads(),
                    "results": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
