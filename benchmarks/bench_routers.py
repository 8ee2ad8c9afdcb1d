"""Routers on a real model: uniform vs static vs dynamic vs sequence (and the headroom oracle) at equal
measured latency.

Protocol (issue 25):

* Text: `--eval-blocks` (32) held-out blocks of `--seq-len` (256) tokens from `--data` (the
  general-English held-out split, `make corpus`), never the text the routers were tuned on.
* No peeking: every block's first `--prefix` tokens are not scored; the dynamic router chooses
  its per-sequence head counts from them alone (flextron.routers.evaluation), as generation
  chooses them at the prompt.  Every routing is scored on the same tokens.
* Timing: for each budget, every routing's sub-network is timed in one round-robin together
  with the dense full model, on held-out text at the latency shape (`--latency-shape`, default
  the routers' own: prefill 4x128; decode:1x256 times one cached step at a 256-token context),
  last-position logits as generation computes them.  Latency is reported as the measured
  fraction of the dense model in the same round.
* Equal measured latency: dynamic (and the oracle) are compared with the static curve (static at
  `--curve-budgets`) interpolated, per block, to their *measured* fraction; the paired per-block
  log-perplexity difference is reported with its standard error.  Static is compared the same
  way with the uniform curve and with the "trained" curve: the configurations the model was
  elastically trained at (budget_configs.json, and the full model), timed in the same round.
* Sequence: the sequence router's choices are made from each evaluated block's prefix, in
  batches of the latency shape's size; it is timed on the evaluated blocks themselves (their
  first tokens at the shape) and scored with the same choices.
* Weight type (`--dtype`): float32, bfloat16 or int8 weights, packed on 2 MiB pages as the
  inference commands run them; the directory's latency table must be of that type
  (`flextron profile --dtype`).
* Oracle (`--oracle`, prefill only): per token, layer and MLP width the first-order change of
  `--oracle-loss` (KL from the full model's predictions, or the scored tokens' own loss) when
  moving from the static configuration's width (flextron.routers.oracle), within
  `--oracle-window` widths of it, allocated with one Lagrange multiplier at the static
  configuration's LUT MLP cost, head counts static's, forced through the routed MLP kernel.

    python benchmarks/bench_routers.py --model runs/smol --data data/general/test --threads 1 \\
        --oracle --out runs/routers

Writes OUT/routers.json, OUT/routers_pareto.png and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flextron.data.blocks import load_blocks
from flextron.latency.interpolation import interpolation_weights
from flextron.latency.profiling import timed_forward
from flextron.latency.shape import LatencyShape
from flextron.model.elastic_model import FlextronModel
from flextron.model.loading import load_model_as
from flextron.model.mixed_widths import ForcedSession
from flextron.model.weight_block import pack_weights_
from flextron.routers import BudgetResolver
from flextron.routers.evaluation import block_losses, prefix_session
from flextron.routers.initial import trained_configurations
from flextron.routers.oracle import allocate_widths, mlp_loss_changes, oracle_sessions, restrict_to_window
from flextron.routers.selection import Selection
from flextron.timing import times_ms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a Flextron directory with latency.json and routers")
    parser.add_argument(
        "--data", default="data/general/test", help="test text (make corpus): nothing is tuned on it"
    )
    parser.add_argument("--budgets", default="0.4,0.5,0.6,0.8")
    parser.add_argument(
        "--curve-budgets", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="static budgets of the curve"
    )
    parser.add_argument(
        "--routings",
        default="uniform,static,dynamic,trained",
        help="of uniform, static, dynamic, sequence, trained (the model's budget configurations)",
    )
    parser.add_argument("--oracle", action="store_true", help="add the headroom oracle (prefill only)")
    parser.add_argument(
        "--oracle-window",
        type=int,
        default=2,
        help="the oracle moves a token's MLP at most this many widths from static's (negative: any width)",
    )
    parser.add_argument(
        "--oracle-loss",
        choices=("teacher", "label"),
        default="teacher",
        help="the loss whose first-order change the oracle allocates by: KL from the full model's "
        "predictions (no knowledge of the scored tokens), or the scored tokens' own loss (leaks them)",
    )
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prefix", type=int, default=32, help="unscored tokens that start every block")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (median); 9 prefill, 21 decode"
    )
    parser.add_argument(
        "--timing-blocks", type=int, default=None, help="batches of the shape per timing; 2 prefill, 4 decode"
    )
    parser.add_argument("--latency-shape", default=None, help="PHASE:BATCHxLENGTH; default the routers'")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "int8"),
        default="float32",
        help="weights the routings run on; the model directory's latency table must be of this type",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/routers")
    parser.add_argument("--title", default="SmolLM2-135M", help="the Pareto plot's title: which model")
    return parser.parse_args(argv)


def load_inference_model(path: str, dtype: str) -> FlextronModel:
    """The model in `dtype` (int8: quantized from its fp32 weights), its weights in one huge-page
    block, as `flextron eval` and `generate` run it."""
    return pack_weights_(load_model_as(path, dtype)).eval()


def trained_selections(model: FlextronModel, resolver: BudgetResolver) -> list[Selection]:
    """The configurations the model was trained at (its budget_configs.json, and the full model);
    their budget is a parameter budget, not a latency fraction."""
    return [
        Selection("trained", budget, arch, predicted_ms=resolver.table.predict(arch, resolver.shape))
        for budget, arch in sorted(trained_configurations(model).items())
    ]


def candidates(model: FlextronModel, resolver: BudgetResolver, args: argparse.Namespace) -> list[dict]:
    """Every (routing, budget) to time and score: dynamic at --budgets, static and uniform at the
    curve's too (the curves others are compared with), the trained configurations."""
    budgets = [float(b) for b in args.budgets.split(",")]
    curve = sorted(set(budgets) | {float(b) for b in args.curve_budgets.split(",")})
    result = []
    for routing in args.routings.split(","):
        if routing == "trained":
            result += [
                {"routing": routing, "budget": s.budget, "selection": s}
                for s in trained_selections(model, resolver)
            ]
            continue
        for budget in curve if routing in ("static", "uniform") else budgets:
            result.append(
                {"routing": routing, "budget": budget, "selection": resolver.select(budget, None, routing)}
            )
    if args.oracle:
        static = {c["budget"]: c["selection"] for c in result if c["routing"] == "static"}
        result += [{"routing": "oracle", "budget": b, "static": static[b]} for b in budgets]
    return result


def oracle_choices(
    model: FlextronModel,
    resolver: BudgetResolver,
    item: dict,
    blocks,
    timing_chunks,
    args: argparse.Namespace,
) -> None:
    """The oracle at the static configuration's LUT MLP cost, its first-order estimate taken at that
    configuration and each token's widths within `--oracle-window` choices of it, by the change of
    `--oracle-loss`: sessions for the blocks and timings."""
    arch, router = item["static"].arch, resolver.routers["static"]
    widths = router.mlp_choices
    _, mlp_costs, _ = resolver.table.cost_vectors(widths, router.head_choices, resolver.shape)
    anchor_choice = [widths.index(w) for w in arch.mlp_widths]
    target = float(sum(mlp_costs[c] for c in anchor_choice))

    def changes_on(tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> Δ (L, B*T, C)
        teacher = None
        if args.oracle_loss == "teacher":
            with torch.no_grad():
                teacher = model(tokens)  # (B, T, V): the full model's predictions
        changes = mlp_loss_changes(model, tokens, arch.heads, widths, arch.mlp_widths, teacher)
        return (
            changes
            if args.oracle_window < 0
            else restrict_to_window(changes, anchor_choice, args.oracle_window)
        )

    changes = torch.cat([changes_on(b) for b in blocks.split(4)], 1)
    choice, multiplier = allocate_widths(changes, mlp_costs, target)  # (L, N*S)
    item["sessions"] = oracle_sessions(choice, widths, arch.heads, 4, blocks.shape[1])
    item["timing_sessions"] = [
        ForcedSession.shared(widths, (changes_on(c) + multiplier * mlp_costs).argmin(-1), arch.heads)
        for c in timing_chunks
    ]
    mean_cost = float(mlp_costs[choice].mean(1).sum())
    item["lut_ms"] = resolver.table.predict(arch, resolver.shape) - target + mean_cost
    item["multiplier"] = multiplier
    item["mean_widths"] = [float(torch.tensor(widths)[c].float().mean()) for c in choice]


def sequence_timing(
    model: FlextronModel, item: dict, blocks: torch.Tensor, prefix: int, shape: LatencyShape
) -> None:
    """The sequence router's timing: the evaluated blocks cut to the shape, in batches of its
    size, each with the session that chose from the batch's prefix (the choices that are scored)."""
    selection = item["selection"]
    item["timing_chunks"] = list(blocks[:, : shape.tokens].split(shape.batch))
    with torch.inference_mode():
        item["timing_sessions"] = [
            prefix_session(model, selection, chunk[:, :prefix]) for chunk in item["timing_chunks"]
        ]


def timing_functions(model: FlextronModel, items: list[dict], chunks: list, phase: str) -> dict:
    """One timed forward per candidate (by index) and the dense model ("full")."""
    functions = {}
    for index, item in enumerate(items):
        selection = item.get("selection")
        if item["routing"] == "sequence":
            functions[index] = timed_forward(
                model, item["timing_chunks"], phase, None, item["timing_sessions"]
            )
        elif item["routing"] == "oracle":
            functions[index] = timed_forward(model, chunks, phase, None, item["timing_sessions"])
        elif selection.arch is not None:
            functions[index] = timed_forward(model, chunks, phase, selection.arch)
        else:
            # Dynamic: heads chosen from each chunk's first call (its prefill), kept for the timed calls.
            item["timing_sessions"] = [selection.session(c.shape[0]) for c in chunks]
            functions[index] = timed_forward(model, chunks, phase, None, item["timing_sessions"])
    functions["full"] = timed_forward(model, chunks, phase)
    return functions


def dynamic_lut_ms(resolver: BudgetResolver, sessions: list) -> float:
    """The LUT latency of a dynamic router's actual choices: fixed + per layer the mean MLP cost over
    the timed tokens and the mean attention cost over sequences."""
    router = resolver.routers["dynamic"]
    fixed, mlp_costs, head_costs = resolver.table.cost_vectors(
        router.mlp_choices, router.head_choices, resolver.shape
    )
    heads = torch.tensor(router.head_choices)
    total = 0.0
    for session in sessions:
        mlp = sum(float(mlp_costs[c.cpu()].mean()) for c in session.mlp_choice)
        attention = sum(
            float(head_costs[(heads[None] == h.cpu()[:, None]).float().argmax(1)].mean())
            for h in session.heads
        )
        total += fixed + mlp + attention
    return total / len(sessions)


def sequence_lut_ms(resolver: BudgetResolver, sessions: list) -> float:
    """The LUT latency of the sequence router's choices: the mean over sequences of their
    configurations' predictions (a mixed batch is not in the table)."""
    chosen = [arch for session in sessions for arch in session.configurations()]
    return sum(resolver.table.predict(arch, resolver.shape) for arch in chosen) / len(chosen)


def score(model: FlextronModel, item: dict, blocks: torch.Tensor, prefix: int) -> torch.Tensor:
    """(N,) per-block mean loss after the unscored prefix."""
    if item["routing"] == "sequence":  # the choices that were timed (a share is met per selection)
        batch = item["timing_chunks"][0].shape[0]
        return block_losses(model, blocks, prefix=prefix, sessions=item["timing_sessions"], batch_size=batch)
    if item["routing"] == "oracle":
        return block_losses(model, blocks, prefix=prefix, sessions=item["sessions"])
    selection = item["selection"]
    if selection.arch is not None:
        return block_losses(model, blocks, prefix=prefix, arch=selection.arch)
    return block_losses(model, blocks, prefix=prefix, sessions=lambda p: prefix_session(model, selection, p))


def curve_comparison(curve: list[tuple[float, torch.Tensor]], fraction: float, losses: torch.Tensor) -> dict:
    """curve: one routing's (measured fraction, per-block losses (N,)), ascending; a row at `fraction`
    with `losses` against the curve interpolated, block by block, to that fraction: the paired
    log-perplexity difference, its standard error, and the perplexity ratio exp(mean)."""
    points = torch.tensor([f for f, _ in curve], dtype=torch.float64)
    static = torch.stack([block for _, block in curve]).double()  # (K, N)
    at_latency = (interpolation_weights(points, torch.tensor([fraction])) @ static)[0]  # (N,)
    difference = losses.double() - at_latency  # (N,) per-block log-perplexity difference
    return {
        "fraction": fraction,
        "curve_ppl": float(at_latency.mean().exp()),
        "log_ppl_difference": float(difference.mean()),
        "standard_error": float(difference.std() / difference.numel() ** 0.5),
        "ratio": float(difference.mean().exp()),
        "within_curve": bool(points[0] <= fraction <= points[-1]),
    }


COMPARED = {
    "dynamic": ("static",),
    "sequence": ("static", "trained"),
    "oracle": ("static",),
    "static": ("uniform", "trained"),
}


def compare_to_curves(rows: list[dict], losses: dict) -> None:
    """Dynamic and oracle rows against static at their measured fraction ("vs_static"), static
    rows against the uniform and trained curves ("vs_uniform", "vs_trained"); the oracle also at
    its LUT fraction plus the dynamic router's measured overhead at the same budget
    ("vs_static_paying_overhead": what a router that chose as the oracle does would pay)."""
    curves = {
        routing: sorted(
            (r["fraction_of_full"], losses[i]) for i, r in enumerate(rows) if r["routing"] == routing
        )
        for routing in ("static", "uniform", "trained")
    }
    overhead = {r["budget"]: r["overhead"] for r in rows if r["routing"] == "dynamic"}
    for index, row in enumerate(rows):
        references = COMPARED.get(row["routing"], ())
        for reference in references:
            if len(curves[reference]) >= 2:
                row[f"vs_{reference}"] = curve_comparison(
                    curves[reference], row["fraction_of_full"], losses[index]
                )
        if row["routing"] == "oracle" and row["budget"] in overhead and len(curves["static"]) >= 2:
            paying = row["lut_fraction"] + max(overhead[row["budget"]], 0.0)
            row["vs_static_paying_overhead"] = curve_comparison(curves["static"], paying, losses[index])


def make_row(item: dict, losses: torch.Tensor, measured: float, full: dict, model: FlextronModel) -> dict:
    """One result row: measured latency (ms and fraction of the dense model in the same round), the
    LUT's fraction, perplexity after the prefix, parameters of a configuration."""
    selection = item.get("selection")
    arch = None if selection is None else selection.arch
    lut_ms = item["lut_ms"] if "lut_ms" in item else selection.predicted_ms
    row = {
        "routing": item["routing"],
        "budget": item["budget"],
        "measured_ms": measured,
        "fraction_of_full": measured / full["measured"],
        "lut_fraction": lut_ms / full["lut"],
        "perplexity": float(losses.mean().exp()),
        "parameters": item.get("parameters") if arch is None else model.num_parameters(arch),
        "arch": None if arch is None else arch.to_dict(),
    }
    row["overhead"] = row["fraction_of_full"] - row["lut_fraction"]  # beyond the latency table
    for key in ("multiplier", "mean_widths", "wide_share"):
        if key in item:
            row[key] = item[key]
    print(
        f"{row['routing']:>8} {row['budget']:.2f}: {measured:7.2f} ms = "
        f"{row['fraction_of_full']:.3f} of dense (LUT {row['lut_fraction']:.3f}) ppl "
        f"{row['perplexity']:9.2f}",
        file=sys.stderr,
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_inference_model(args.model, args.dtype)
    resolver = BudgetResolver(
        model, args.model, LatencyShape.parse(args.latency_shape) if args.latency_shape else None
    )
    if resolver.table is None:
        raise SystemExit(f"{args.model} has no latency table: run flextron profile first")
    shape = resolver.shape
    repeats = args.repeats or (21 if shape.phase == "decode" else 9)
    timing_blocks = args.timing_blocks or (4 if shape.phase == "decode" else 2)
    blocks = load_blocks(model.tokenizer, args.data, args.seq_len, args.eval_blocks, split="eval")
    timing = load_blocks(model.tokenizer, args.data, shape.tokens, shape.batch * timing_blocks, split="eval")
    if blocks.shape[0] < args.eval_blocks or timing.shape[0] < shape.batch * timing_blocks:
        raise SystemExit(f"not enough held-out text in {args.data}")
    chunks = list(timing.split(shape.batch))  # timing_blocks x (batch, tokens)
    items = candidates(model, resolver, args)
    if args.oracle and shape.phase != "prefill":
        raise SystemExit("the oracle is measured at a prefill shape")
    for item in items:
        if item["routing"] == "oracle":
            oracle_choices(model, resolver, item, blocks, chunks, args)
        elif item["routing"] == "sequence":
            sequence_timing(model, item, blocks, args.prefix, shape)
    with torch.inference_mode():
        functions = timing_functions(model, items, chunks, shape.phase)
        measured = times_ms(functions, torch.device("cpu"), repeats, 2, resolver.table.clock)
    # Per chunk of the shape: the sequence router is timed on chunks of its own.
    counts = {k: len(items[k].get("timing_chunks", chunks)) for k in measured if k != "full"}
    times = {k: ms / counts.get(k, len(chunks)) for k, ms in measured.items()}
    full = {"measured": times["full"], "lut": resolver.table.predict(model.full_arch(), shape)}
    for item in items:
        if item["routing"] == "dynamic":
            item["lut_ms"] = dynamic_lut_ms(resolver, item["timing_sessions"])
        elif item["routing"] == "sequence":
            item["lut_ms"] = sequence_lut_ms(resolver, item["timing_sessions"])
            chosen = [a for s in item["timing_sessions"] for a in s.configurations()]
            item["wide_share"] = sum(a == item["selection"].router.wide for a in chosen) / len(chosen)
            item["parameters"] = round(sum(map(model.num_parameters, chosen)) / len(chosen))
    losses = {i: score(model, item, blocks, args.prefix) for i, item in enumerate(items)}
    rows = [make_row(item, losses[i], times[i], full, model) for i, item in enumerate(items)]
    compare_to_curves(rows, losses)
    summary = {
        "shape": shape.to_dict(),
        "device": resolver.table.device_name,
        "clock": resolver.table.clock,
        "model": args.model,
        "data": args.data,
        "eval_blocks": int(blocks.shape[0]),
        "seq_len": args.seq_len,
        "prefix": args.prefix,
        "repeats": repeats,
        "timing_blocks": timing_blocks,
        "full_ms_measured": full["measured"],
        "full_ms_lut": full["lut"],
        "rows": rows,
        "block_losses": {f"{r['routing']} {r['budget']:g}": losses[i].tolist() for i, r in enumerate(rows)},
    }
    (out / "routers.json").write_text(json.dumps(summary, indent=2))
    plot(rows, out / "routers_pareto.png", shape, args.title)
    print(markdown(rows))
    return 0


def plot(rows: list[dict], path: Path, shape: LatencyShape, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    routings = ("uniform", "static", "dynamic", "sequence", "oracle", "trained")
    for routing, marker in zip(routings, "os^PDv", strict=True):
        points = sorted(
            (r["measured_ms"], r["perplexity"], r["budget"]) for r in rows if r["routing"] == routing
        )
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker + "-", label=routing)
            for ms, ppl, budget in points:
                axis.annotate(f"{budget:g}", (ms, ppl), textcoords="offset points", xytext=(3, 3), fontsize=7)
    axis.set_xlabel(f"measured latency (ms), {shape}")
    axis.set_ylabel("perplexity (held-out, after the prefix)")
    axis.set_yscale("log")
    axis.set_title(f"{title}: perplexity vs measured latency")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| routing | budget | measured ms | ÷ dense (LUT) | perplexity | compared with | at that latency | "
        "Δ log-ppl ± s.e. | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = (
            f"| {r['routing']} | {r['budget']:.2f} | {r['measured_ms']:.1f} | {r['fraction_of_full']:.3f} "
            f"({r['lut_fraction']:.3f}) | {r['perplexity']:.2f} |"
        )
        comparisons = [
            (k[3:], v) for k, v in r.items() if k.startswith("vs_") and k != "vs_static_paying_overhead"
        ]
        for reference, versus in comparisons or [("-", None)]:
            compared = (
                f" {reference} | {versus['curve_ppl']:.2f} | {versus['log_ppl_difference']:+.3f} "
                f"± {versus['standard_error']:.3f} | {versus['ratio']:.3f}"
                f"{'' if versus['within_curve'] else ' (outside the curve)'} |"
                if versus
                else " - | - | - | - |"
            )
            lines.append(head + compared)
    paying = [r for r in rows if "vs_static_paying_overhead" in r]
    if paying:
        lines += [
            "",
            "| oracle budget | fraction paying dynamic's overhead | static there | ratio ± s.e. (log) |",
            "|---|---|---|---|",
        ]
        for r in paying:
            v = r["vs_static_paying_overhead"]
            lines.append(
                f"| {r['budget']:.2f} | {v['fraction']:.3f} | {v['curve_ppl']:.2f} | "
                f"{v['ratio']:.3f} ({v['log_ppl_difference']:+.3f} ± {v['standard_error']:.3f}) |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
