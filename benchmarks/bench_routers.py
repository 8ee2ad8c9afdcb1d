"""Routers on a real model: measured latency vs target per budget, and the Pareto curve.

For each budget, three ways to pick the sub-network (flextron.routers.selection): uniform widths
(nearest LUT latency), the static router, the dynamic router.  Each is timed on this
device (median over repeats, round-robin with the dense full model, on held-out text at the
LUT reference shape: a prefill, or with --latency-shape decode:BxL one cached decode step at
that context; last-position logits as generation runs it) and scored (perplexity on held-out
built-in text).  Then, at prefill shapes, the dynamic router's real speedup at equal batch:
full model vs dynamic routing, both timed.

    flextron convert --model default --out runs/smol
    flextron profile --model runs/smol --threads 1
    flextron train-router --model runs/smol --kind static --threads 1
    flextron train-router --model runs/smol --kind dynamic --mode end-to-end --threads 1
    python benchmarks/bench_routers.py --model runs/smol --threads 1 --out runs/routers

Writes OUT/routers.json, OUT/routers_pareto.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flextron.data.blocks import load_blocks
from flextron.eval.perplexity import frontier_perplexity, pareto_frontier, perplexity
from flextron.latency.profiling import measure_latency, timed_forward
from flextron.latency.shape import LatencyShape
from flextron.model.checkpoint import load_pretrained
from flextron.model.elastic_model import FlextronModel
from flextron.routers import BudgetResolver, dynamic_perplexity
from flextron.timing import times_ms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a Flextron directory with latency.json and routers")
    parser.add_argument("--budgets", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--routings", default="uniform,static,dynamic")
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats (median); default 9 at prefill, 21 at decode (noisier)",
    )
    parser.add_argument(
        "--timing-blocks",
        type=int,
        default=None,
        help="held-out batches of the LUT shape per timing (dynamic widths depend on text); "
        "default 2 at prefill, 4 at decode (one token each)",
    )
    parser.add_argument(
        "--latency-shape",
        default=None,
        help="PHASE:BATCHxLENGTH the budgets refer to and the timings run at, e.g. "
        "decode:1x256 (one step at that context); default: the routers' shape",
    )
    parser.add_argument(
        "--speedup-batch", type=int, default=4, help="batch of the dynamic speedup test (prefill shapes only)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/routers")
    parser.add_argument("--label", default=None, help="name this run's rows ROUTING-LABEL (e.g. static-e2e)")
    parser.add_argument(
        "--include",
        default=None,
        help="routers.json of an earlier run whose rows join this run's table and plot",
    )
    return parser.parse_args(argv)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    markers = iter("os^vDP*X")
    for routing in dict.fromkeys(r["routing"] for r in rows):
        marker = next(markers, "o") + "-"
        points = sorted(
            (r["measured_ms"], r["perplexity"], r["budget"]) for r in rows if r["routing"] == routing
        )
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker, label=routing)
            for ms, ppl, budget in points:
                axis.annotate(f"{budget:g}", (ms, ppl), textcoords="offset points", xytext=(3, 3), fontsize=7)
    axis.set_xlabel("measured latency (ms)")
    axis.set_ylabel("perplexity (held-out)")
    axis.set_yscale("log")
    axis.set_title("SmolLM2-135M: perplexity vs measured latency per budget")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_pretrained(args.model)
    shape = LatencyShape.parse(args.latency_shape) if args.latency_shape else None
    resolver = BudgetResolver(model, args.model, shape)
    if resolver.table is None:
        raise SystemExit(f"{args.model} has no latency table: run flextron profile first")
    phase, length = resolver.shape.phase, resolver.shape.length
    if args.repeats is None:
        args.repeats = 21 if phase == "decode" else 9
    if args.timing_blocks is None:
        args.timing_blocks = 4 if phase == "decode" else 2
    full_ms = resolver.table.predict(model.full_arch(), resolver.shape)
    clock = resolver.table.clock
    blocks = load_blocks(model.tokenizer, None, args.seq_len, args.eval_blocks, split="eval")
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = json.loads(Path(args.include).read_text())["rows"] if args.include else []
    # Select first, then time every selection in one round-robin measurement, so that drifts
    # of a shared machine hit all rows alike.
    selections = [
        (routing, budget, resolver.select(budget=budget, method=routing))
        for routing in args.routings.split(",")
        for budget in budgets
    ]
    times = time_selections(model, resolver.shape, [s for _, _, s in selections], args, clock)
    print(
        f"dense full model: {times['full']:.2f} ms measured, {full_ms:.2f} ms in the LUT "
        f"({100 * (times['full'] / full_ms - 1):+.1f}%)",
        file=sys.stderr,
        flush=True,
    )
    for index, (routing, budget, selection) in enumerate(selections):
        name = routing if args.label is None else f"{routing}-{args.label}"
        rows.append(
            selection_row(
                model,
                blocks,
                name,
                budget,
                selection,
                times[index],
                full_measured=times["full"],
                full_ms=full_ms,
            )
        )
    compare_to_uniform(rows)
    speedup = (
        dynamic_speedup(
            model, resolver, args.speedup_batch, length, repeats=args.repeats, budgets=budgets, clock=clock
        )
        if args.speedup_batch > 0 and phase == "prefill"
        else []
    )
    summary = {
        "shape": resolver.shape.to_dict(),
        "full_ms_lut": full_ms,
        "full_ms_measured": times["full"],
        "timing_blocks": args.timing_blocks,
        "device": resolver.table.device_name,
        "clock": clock,
        "model": args.model,
        "rows": rows,
        "dynamic_speedup": speedup,
        "wins_over_uniform": wins(rows),
    }
    (out / "routers.json").write_text(json.dumps(summary, indent=2))
    plot(rows, out / "routers_pareto.png")
    print(markdown(rows, speedup))
    return 0


def time_selections(
    model: FlextronModel, shape: LatencyShape, selections: list, args: argparse.Namespace, clock: str
) -> dict:
    """Median ms per timing batch of every selection (by index) and of the dense full model ("full"),
    all in one round-robin measurement on held-out text."""
    phase, batch, tokens = shape.phase, shape.batch, shape.tokens
    # Timed on held-out text: the dynamic router's widths depend on the tokens (static ones do not).
    # Decode: a prompt of `length` tokens fills the cache, then its next token is the timed step.
    timing_text = load_blocks(model.tokenizer, None, tokens, batch * args.timing_blocks, split="eval")
    if timing_text.shape[0] < batch * args.timing_blocks:
        raise SystemExit(
            f"not enough held-out text for {args.timing_blocks} timing batches of {batch}x{tokens}"
        )
    chunks = timing_text.split(batch)  # timing_blocks x (batch, tokens)
    with torch.inference_mode():
        # Dynamic: one session per chunk, heads fixed at its first call, as in generation.
        functions = {
            i: timed_forward(model, chunks, phase, s.arch, [s.session(batch) for _ in chunks])
            for i, s in enumerate(selections)
        }
        # The dense full model in the same round: a budget is a fraction of its latency, and the
        # fraction measured against it holds even when a shared machine drifts from the LUT.
        functions["full"] = timed_forward(model, chunks, phase)
        times = {
            key: ms / len(chunks)
            for key, ms in times_ms(functions, torch.device("cpu"), args.repeats, 2, clock).items()
        }
    return times


def selection_row(
    model: FlextronModel,
    blocks: torch.Tensor,
    name: str,
    budget: float,
    selection,
    measured: float,
    *,
    full_measured: float,
    full_ms: float,
) -> dict:
    """One result row: measured latency against the budget's target, perplexity, parameters."""
    if selection.arch is not None:
        ppl, _ = perplexity(model, blocks, selection.arch)
        params = model.num_parameters(selection.arch)
    else:
        ppl, params = dynamic_perplexity(model, blocks, selection)
    target = budget * full_ms
    fraction = measured / full_measured
    row = {
        "routing": name,
        "budget": budget,
        "target_ms": target,
        "measured_ms": measured,
        "predicted_ms": selection.predicted_ms,
        "error": (measured - target) / target,
        "fraction_of_full": fraction,
        "fraction_error": (fraction - budget) / budget,
        "perplexity": ppl,
        "parameters": params,
        "arch": None if selection.arch is None else selection.arch.to_dict(),
    }
    print(
        f"{name:>8} {budget:.2f}: target {target:7.2f} ms measured {measured:7.2f} ms "
        f"({100 * row['error']:+.1f}%), {fraction:.3f} of the full model "
        f"({100 * row['fraction_error']:+.1f}%) ppl {ppl:8.2f}",
        file=sys.stderr,
        flush=True,
    )
    return row


def compare_to_uniform(rows: list[dict]) -> None:
    """Adds to every non-uniform row the uniform Pareto frontier's perplexity at its measured
    latency (log-linear interpolation between the uniform rows of the same table, generous to
    uniform) and whether the row beats it: lower perplexity at equal measured latency."""
    uniform = [(r["measured_ms"], r["perplexity"]) for r in rows if r["routing"].startswith("uniform")]
    if not uniform:
        return
    frontier = pareto_frontier(uniform)
    for row in rows:
        if not row["routing"].startswith("uniform"):
            row["uniform_frontier_ppl"] = frontier_perplexity(frontier, row["measured_ms"])
            row["beats_uniform"] = row["perplexity"] < row["uniform_frontier_ppl"]


def wins(rows: list[dict]) -> dict[str, list[float]]:
    """Per routing, the budgets at which it beats the uniform frontier."""
    result: dict[str, list[float]] = {}
    for row in rows:
        if "beats_uniform" in row:
            result.setdefault(row["routing"], [])
            if row["beats_uniform"]:
                result[row["routing"]].append(row["budget"])
    return result


def dynamic_speedup(
    model: FlextronModel,
    resolver: BudgetResolver,
    batch: int,
    length: int,
    *,
    repeats: int,
    budgets: list[float],
    clock: str,
) -> list[dict]:
    """Prefill at equal batch: the full model vs dynamic routing (ops.route + ops.routed_nested_mlp)."""
    if "dynamic" not in resolver.routers:
        return []
    results = []
    shape = LatencyShape("prefill", batch, length)
    full = measure_latency(model, [model.full_arch()], shape, repeats=repeats, clock=clock)[0]
    for budget in budgets:
        if budget >= 1.0:
            continue
        selection = resolver.select(budget=budget, method="dynamic")
        routed = measure_latency(
            model, [model.full_arch()], shape, repeats=repeats, session=selection.session(batch), clock=clock
        )[0]
        results.append(
            {
                "budget": budget,
                "batch": batch,
                "length": length,
                "full_ms": full,
                "dynamic_ms": routed,
                "speedup": full / routed,
            }
        )
        print(
            f"dynamic speedup at budget {budget:.2f}, batch {batch}x{length}: {full / routed:.2f}x",
            file=sys.stderr,
            flush=True,
        )
    return results


def markdown(rows: list[dict], speedup: list[dict]) -> str:
    lines = [
        "| routing | budget | target ms | measured ms | error | ÷ full, same round (error) | "
        "perplexity | uniform frontier ppl | beats uniform | params (M) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frontier = f"{r['uniform_frontier_ppl']:.2f}" if "uniform_frontier_ppl" in r else "-"
        beats = {True: "yes", False: "no"}.get(r.get("beats_uniform"), "-")
        fraction = (
            f"{r['fraction_of_full']:.3f} ({100 * r['fraction_error']:+.1f}%)"
            if "fraction_of_full" in r
            else "-"
        )  # rows of --include runs may predate it
        lines.append(
            f"| {r['routing']} | {r['budget']:.2f} | {r['target_ms']:.1f} | "
            f"{r['measured_ms']:.1f} | {100 * r['error']:+.1f}% | {fraction} | "
            f"{r['perplexity']:.2f} | "
            f"{frontier} | {beats} | {r['parameters'] / 1e6:.1f} |"
        )
    lines += [
        "",
        *(
            f"{routing}: beats the uniform frontier at budgets {budgets}"
            for routing, budgets in wins(rows).items()
        ),
    ]
    if speedup:
        lines += ["", "| budget | batch x length | full ms | dynamic ms | speedup |", "|---|---|---|---|---|"]
        for s in speedup:
            lines.append(
                f"| {s['budget']:.2f} | {s['batch']}x{s['length']} | {s['full_ms']:.1f} | "
                f"{s['dynamic_ms']:.1f} | {s['speedup']:.2f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
