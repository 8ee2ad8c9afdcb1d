"""Evidence for conversion: perplexity per budget with importance ordering vs random ordering.

    python benchmarks/bench_conversion.py                     # SmolLM2-135M, built-in text
    python benchmarks/bench_conversion.py --calib-samples 32 --eval-blocks 24 --json out.json

No training: the sub-networks are prefixes of the permuted pretrained weights.  Importance
is computed on the built-in calibration split; perplexity on the held-out split.  The
random baseline permutes neurons and KV groups / heads at random (same function at full
width).  Results go to docs/conversion.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from flextron.conversion.ranking import compute_importance, orders_from_importance, permute, random_orders
from flextron.data.blocks import load_blocks
from flextron.eval.perplexity import archs_for_budgets, evaluate_archs
from flextron.model.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--budgets", default="1.0,0.75,0.5,0.25")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=2, help="random orderings to average over")
    parser.add_argument("--json", default="benchmarks/results/bench_conversion.json")
    args = parser.parse_args()
    torch.manual_seed(0)

    source = load_model(args.model)
    budgets = [float(b) for b in args.budgets.split(",")]
    calibration = load_blocks(source.tokenizer, "builtin", args.seq_len, args.calib_samples, split="train")
    held_out = load_blocks(source.tokenizer, "builtin", args.seq_len, args.eval_blocks, split="eval")
    with torch.no_grad():
        scores = compute_importance(source, calibration, batch_size=4)
    orderings = {"importance": orders_from_importance(source.config, scores)}
    orderings |= {f"random (seed {seed})": random_orders(source.config, seed) for seed in range(args.seeds)}
    results = {}
    for name, orders in orderings.items():
        model = copy.deepcopy(source)
        permute(model, orders)
        print(f"evaluating {name} ordering", file=sys.stderr)
        results[name] = evaluate_archs(model, held_out, archs_for_budgets(model, budgets), batch_size=4)
        del model

    print(
        f"\nperplexity on {held_out.numel()} held-out built-in tokens "
        f"(calibration: {calibration.numel()} tokens), no training\n"
    )
    names = list(results)
    print("| budget | MLP width, heads | parameters (M) | " + " | ".join(names) + " |")
    print("|---" * (3 + len(names)) + "|")
    for index, budget in enumerate(budgets):
        row = results[names[0]][index]
        arch = row["arch"]
        cells = " | ".join(f"{results[n][index]['perplexity']:.2f}" for n in names)
        print(
            f"| {budget:g} | {arch['mlp_widths'][0]}, {arch['heads'][0]} | {row['parameters'] / 1e6:.1f} | "
            f"{cells} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "held_out_tokens": held_out.numel(),
                    "calibration_tokens": calibration.numel(),
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
