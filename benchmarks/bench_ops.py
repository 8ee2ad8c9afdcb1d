"""Op benchmarks: flextron ops against what a user would otherwise write, in one run.

    python benchmarks/bench_ops.py --device cpu [--json runs/bench_ops_cpu.json]
    python benchmarks/bench_ops.py --device cuda --json runs/bench_ops_cuda.json

On CUDA it also runs the issue-sized routed layer (bf16, T=8192, d=4096, d_ff=14336, 4 widths,
uniform routing), forward and forward+backward, and reports useful TFLOP/s as a percentage of
the card's measured bf16 dense matmul rate (torch.mm, 8192^3).

Every case times our op and its baselines interleaved (flextron.timing: round-robin, after a
warm-up, CUDA-synchronised), so that load from other processes hits them alike; the figure
is the median over rounds. fp32 on the CPU, bf16 on CUDA. A table with a ratio column
(ours / baseline: < 1 means we are faster) is printed with PASS/FAIL for the
targets, and every figure goes to JSON.

Before a case is timed, every result of ours in it is checked against the plain PyTorch
computation (the per-group loop for the routed MLP, its gradients for fwd+bwd, sliced F.linear
otherwise): the relative error max|ours - theirs| / max|theirs| is printed and stored, a row
whose values are off says WRONG in the table, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flextron import ops
from flextron.timing import times_ms


@dataclass(frozen=True)
class LinearCase:
    """nested_linear on the prefix weight[:out, :in] of an (O, I) weight, x: (tokens, in)."""

    name: str
    weight_out: int
    weight_in: int
    out_features: int
    in_features: int
    tokens: int = 2048


@dataclass(frozen=True)
class MlpCase:
    """An MLP of hidden size `hidden` and d_ff `d_ff` on `tokens` tokens."""

    name: str
    tokens: int = 2048
    hidden: int = 576
    d_ff: int = 1536
    widths: tuple[int, ...] = (1536, 1152, 768, 384)
    activation: str = "swiglu"
    seed: int = 0


@dataclass
class Row:
    """One comparison: ours against a baseline, with an optional target on the ratio."""

    case: str
    ours: str
    baseline: str
    ours_ms: float
    baseline_ms: float
    target: str = ""  # e.g. "<= 1.05" on ours/baseline
    passed: bool | None = None
    useful_tflops: float | None = None  # CUDA: useful FLOPs of our op per second
    peak_pct: float | None = None  # useful_tflops as % of the measured dense matmul rate
    max_rel_err: float | None = None  # our result against the PyTorch one (see check_values)
    values_ok: bool | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.baseline_ms


LINEAR_CASES = (
    LinearCase("up_proj 1536x576 -> out 768", 1536, 576, 768, 576),
    LinearCase("down_proj 576x1536 -> in 768", 576, 1536, 576, 768),
    LinearCase("square 2048x2048 -> 1024x1024", 2048, 2048, 1024, 1024),
    LinearCase("wide 4096x1024 -> out 2048", 4096, 1024, 2048, 1024),
)
ROUTED_CASE = MlpCase("routed T=2048 d=576 d_ff=1536 widths 1536/1152/768/384")
DECODE_CASE = MlpCase("routed decode T=16 (informative)", tokens=16)
# The issue's GPU case (CUDA only): a Llama-3-8B-sized MLP, 4 widths, uniform routing.
ISSUE_CASE = MlpCase(
    "routed T=8192 d=4096 d_ff=14336 4 widths",
    tokens=8192,
    hidden=4096,
    d_ff=14336,
    widths=(14336, 10752, 7168, 3584),
)


WARMUP = 3  # untimed calls of each function before its timed rounds

# Relative error allowed by dtype: a few roundings of the output's dtype, far below what a
# wrong tile, group or band gives (an O(1) error).
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def check_values(case: str, what: str, ours, theirs) -> tuple[float, bool]:
    """max|ours - theirs| / max|theirs| over tensors (or sequences of them, worst one taken),
    printed; returns (error, within tolerance)."""
    pairs = list(zip(ours, theirs, strict=True)) if isinstance(ours, (list, tuple)) else [(ours, theirs)]
    worst = 0.0
    for mine, reference in pairs:
        reference = reference.float()
        scale = reference.abs().max().item() or 1.0
        error = (mine.float() - reference).abs().max().item() / scale
        worst = max(worst, error if error == error else float("inf"))  # NaN counts as wrong
    ok = worst <= CHECK_TOLERANCE[pairs[0][0].dtype]
    print(f"  check {case}: {what}: relative error {worst:.2e} {'ok' if ok else 'WRONG'}", flush=True)
    return worst, ok


def _mark(rows: list[Row], error: float, ok: bool) -> None:
    for row in rows:
        row.max_rel_err, row.values_ok = error, ok


def _has_kernel(op_name: str, device: torch.device) -> bool:
    return device.type.upper() in ops.backends(op_name)


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype, size: int = 8192, rounds: int = 5
) -> float:
    """The card's dense matmul rate in this dtype: torch.mm on (size, size) operands, TFLOP/s."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    ms = times_ms({"mm": lambda: torch.mm(a, b)}, device, rounds, WARMUP, calls=10)["mm"]
    return 2.0 * size**3 / ms / 1e9


def dense_mlp(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """The plain full-width SwiGLU MLP.  x: (T, D) -> (T, D)."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def group_loop_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    choice: torch.Tensor,
    widths: tuple[int, ...],
) -> torch.Tensor:
    """Routed MLP as a user would write it: gather each width group, slice the weights, scatter back."""
    y = torch.empty_like(x)  # (T, D)
    order = torch.argsort(choice, stable=True)
    counts = torch.bincount(choice, minlength=len(widths)).tolist()
    start = 0
    for width, count in zip(widths, counts, strict=True):
        if count == 0:
            continue
        rows = order[start : start + count]
        start += count
        xs = x.index_select(0, rows)  # (n, D)
        hidden = F.silu(F.linear(xs, w_gate[:width])) * F.linear(xs, w_up[:width])  # (n, width)
        y.index_copy_(0, rows, F.linear(hidden, w_down[:, :width]))
    return y


def mlp_flops(tokens_per_width: list[tuple[int, int]], hidden: int, gated: bool) -> float:
    """FLOPs of the MLP GEMMs for (tokens, width) pairs."""
    gemms = 3 if gated else 2
    return float(sum(2 * gemms * tokens * width * hidden for tokens, width in tokens_per_width))


def bench_linear(case: LinearCase, device: torch.device, dtype: torch.dtype, rounds: int) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(case.weight_out, case.weight_in, generator=gen).to(device, dtype)
    x = torch.randn(case.tokens, case.in_features, generator=gen).to(device, dtype)
    dense = weight[: case.out_features, : case.in_features].contiguous()  # same reduced shape
    fns = {
        "F.linear dense": lambda: F.linear(x, dense),
        "F.linear slice.contiguous()": lambda: F.linear(
            x, weight[: case.out_features, : case.in_features].contiguous()
        ),
    }
    check = None
    if _has_kernel("nested_linear", device):
        fns["nested_linear"] = lambda: ops.nested_linear(x, weight, None, case.out_features, case.in_features)
        check = check_values(
            case.name, "nested_linear vs F.linear", fns["nested_linear"](), fns["F.linear dense"]()
        )
    reps = 10 if device.type == "cpu" else 50
    ms = times_ms(fns, device, rounds, WARMUP, calls=reps)
    if "nested_linear" not in ms:
        print(f"  {case.name}: nested_linear not built for {device.type}", file=sys.stderr)
        return []
    flops = 2.0 * case.tokens * case.out_features * case.in_features
    tflops = flops / ms["nested_linear"] / 1e9 if device.type == "cuda" else None
    dense_row = Row(
        case.name, "nested_linear", "F.linear dense", ms["nested_linear"], ms["F.linear dense"], "<= 1.05"
    )
    # A row prefix of a contiguous weight is contiguous already: .contiguous() copies
    # nothing, so there the fair target is parity, not a win.
    copies = not weight[: case.out_features, : case.in_features].is_contiguous()
    copy_row = Row(
        case.name,
        "nested_linear",
        "F.linear slice.contiguous()" if copies else "F.linear slice (no copy needed)",
        ms["nested_linear"],
        ms["F.linear slice.contiguous()"],
        "< 1.00" if copies else "<= 1.05",
    )
    dense_row.passed = dense_row.ratio <= 1.05
    copy_row.passed = copy_row.ratio < 1.0 if copies else copy_row.ratio <= 1.05
    dense_row.useful_tflops = copy_row.useful_tflops = tflops
    _mark([dense_row, copy_row], *check)
    return [dense_row, copy_row]


def _mlp_weights(case: MlpCase, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.tokens, case.hidden, generator=gen)
    w_gate = torch.randn(case.d_ff, case.hidden, generator=gen) / case.hidden**0.5
    w_up = torch.randn(case.d_ff, case.hidden, generator=gen) / case.hidden**0.5
    w_down = torch.randn(case.hidden, case.d_ff, generator=gen) / case.d_ff**0.5
    return tuple(t.to(device, dtype) for t in (x, w_gate, w_up, w_down))


def check_route(case: str, x: torch.Tensor, router: torch.Tensor) -> tuple[float, bool]:
    """ops.route's choices on x (T, d) against argmax(x @ router^T): the fraction of tokens whose
    choice differs, printed; returns (that fraction, within tolerance)."""
    disagree = (ops.route(x, router)[0] != F.linear(x, router).argmax(1)).float().mean().item()
    ok = disagree <= 1e-3
    print(
        f"  check {case}: route vs argmax: {disagree:.2e} of tokens differ {'ok' if ok else 'WRONG'}",
        flush=True,
    )
    return disagree, ok


def bench_routed(
    case: MlpCase, device: torch.device, dtype: torch.dtype, rounds: int, targets: bool = True
) -> list[Row]:
    x, w_gate, w_up, w_down = _mlp_weights(case, device, dtype)
    gen = torch.Generator().manual_seed(case.seed + 1)
    num_choices = len(case.widths)
    choice = torch.randint(0, num_choices, (case.tokens,), generator=gen).to(device)  # uniform routing
    router = (torch.randn(num_choices, case.hidden, generator=gen) / case.hidden**0.5).to(device, dtype)
    widths = list(case.widths)
    fns = {
        "group loop": lambda: group_loop_mlp(x, w_gate, w_up, w_down, choice, case.widths),
        "dense full width": lambda: dense_mlp(x, w_gate, w_up, w_down),
    }
    have_routed = _has_kernel("routed_nested_mlp", device)
    check = None
    if have_routed:
        fns["routed_nested_mlp"] = lambda: ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths)
        check = check_values(
            case.name, "routed_nested_mlp vs group loop", fns["routed_nested_mlp"](), fns["group loop"]()
        )
    route_check = None
    if _has_kernel("route", device):
        fns["route"] = lambda: ops.route(x, router)
        route_check = check_route(case.name, x, router)
    grouped = _grouped_mm_mlp(x, w_gate, w_up, w_down, choice, num_choices)
    if grouped is not None:
        fns["torch._grouped_mm full width"] = grouped[0]
    reps = (3 if device.type == "cpu" else 20) * max(1, 256 // case.tokens)
    ms = times_ms(fns, device, rounds, WARMUP, calls=reps)
    if not have_routed:
        print(f"  {case.name}: routed_nested_mlp not built for {device.type}", file=sys.stderr)
        return []
    counts = torch.bincount(choice.cpu(), minlength=num_choices).tolist()
    flops = mlp_flops(list(zip(counts, widths, strict=True)), case.hidden, gated=True)
    tflops = flops / ms["routed_nested_mlp"] / 1e9 if device.type == "cuda" else None
    extra = {
        "route_ms": ms.get("route"),
        "route_over_mlp": ms["route"] / ms["routed_nested_mlp"] if "route" in ms else None,
    }
    ours = ms["routed_nested_mlp"]
    rows = [
        Row(
            case.name,
            "routed_nested_mlp",
            "group loop",
            ours,
            ms["group loop"],
            ">= 1.3x faster",
            extra=extra,
        ),
        Row(
            case.name, "routed_nested_mlp", "dense full width", ours, ms["dense full width"], ">= 1.4x faster"
        ),
    ]
    if targets:
        rows[0].passed = rows[0].ratio <= 1 / 1.3
        rows[1].passed = rows[1].ratio <= 1 / 1.4
    else:
        rows[0].target = rows[1].target = ""
    if "route" in ms:
        rows.append(Row(case.name, "route", "routed_nested_mlp", ms["route"], ours))
        _mark(rows[-1:], *route_check)
    if "torch._grouped_mm full width" in ms:
        rows.append(
            Row(
                case.name,
                "routed_nested_mlp",
                "torch._grouped_mm full width",
                ours,
                ms["torch._grouped_mm full width"],
            )
        )
    for row in rows:
        row.useful_tflops = tflops if row.ours == "routed_nested_mlp" else None
    _mark([row for row in rows if row.ours == "routed_nested_mlp"], *check)
    return rows


def bench_routed_train(
    case: MlpCase, device: torch.device, dtype: torch.dtype, rounds: int, reps: int | None = None
) -> list[Row]:
    """Forward + backward (grads of x and the three weights): routed_nested_mlp vs the group
    loop, the full-width dense MLP and (CUDA) torch._grouped_mm at full width."""
    if not _has_kernel("routed_nested_mlp", device):
        return []
    x, w_gate, w_up, w_down = (t.requires_grad_() for t in _mlp_weights(case, device, dtype))
    gen = torch.Generator().manual_seed(case.seed + 1)
    num_choices = len(case.widths)
    choice = torch.randint(0, num_choices, (case.tokens,), generator=gen).to(device)
    leaves = (x, w_gate, w_up, w_down)
    widths = list(case.widths)

    def backward_of(
        forward: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]
    ) -> Callable[[], tuple[torch.Tensor, ...]]:
        def run() -> tuple[torch.Tensor, ...]:
            y = forward()
            return torch.autograd.grad(y, inputs, torch.ones_like(y))

        return run

    fns = {
        "routed": backward_of(lambda: ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths), leaves),
        "group loop": backward_of(
            lambda: group_loop_mlp(x, w_gate, w_up, w_down, choice, case.widths), leaves
        ),
        "dense full width": backward_of(lambda: dense_mlp(x, w_gate, w_up, w_down), leaves),
    }
    grouped = _grouped_mm_mlp(x, w_gate, w_up, w_down, choice, num_choices, trainable=True)
    if grouped is not None:
        forward, grouped_leaves = grouped
        fns["torch._grouped_mm full width"] = backward_of(forward, grouped_leaves)
        try:
            fns["torch._grouped_mm full width"]()
        except RuntimeError as error:  # no backward for these layouts in this torch
            print(f"  torch._grouped_mm backward unavailable: {error}", file=sys.stderr)
            del fns["torch._grouped_mm full width"]
    check = check_values(
        case.name + " fwd+bwd",
        "grads (x, gate, up, down) vs group loop",
        fns["routed"](),
        fns["group loop"](),
    )
    if reps is None:
        reps = 1 if device.type == "cpu" else 10
    ms = times_ms(fns, device, rounds, WARMUP, calls=reps)
    counts = torch.bincount(choice.cpu(), minlength=num_choices).tolist()
    # Useful FLOPs: the forward's GEMMs and twice that for the backward (dX and dW).
    flops = 3 * mlp_flops(list(zip(counts, widths, strict=True)), case.hidden, gated=True)
    tflops = flops / ms["routed"] / 1e9 if device.type == "cuda" else None
    name = case.name + " fwd+bwd"
    rows = [
        Row(name, "routed_nested_mlp", baseline, ms["routed"], ms[baseline], useful_tflops=tflops)
        for baseline in fns
        if baseline != "routed"
    ]
    _mark(rows, *check)
    return rows


def _grouped_mm_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    choice: torch.Tensor,
    groups: int,
    trainable: bool = False,
) -> tuple[Callable[[], torch.Tensor], tuple[torch.Tensor, ...]] | None:
    """torch._grouped_mm over the width groups, every group at full width (it needs one N per
    call), on per-group weight copies made once (as an MoE layer stores them). Returns the
    forward and the tensors to differentiate (x_sorted and the copies when `trainable`), or
    None where torch._grouped_mm does not apply (no such op, not CUDA, unsupported arch)."""
    if x.device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return None
    order = torch.argsort(choice, stable=True)
    offs = torch.cumsum(torch.bincount(choice, minlength=groups), 0).to(torch.int32)
    with torch.no_grad():
        xs = x.index_select(0, order)  # (T, D)
        gate_b = w_gate.t().unsqueeze(0).expand(groups, -1, -1).contiguous()  # (G, D, F)
        up_b = w_up.t().unsqueeze(0).expand(groups, -1, -1).contiguous()
        down_b = w_down.t().unsqueeze(0).expand(groups, -1, -1).contiguous()  # (G, F, D)
    leaves = tuple(t.requires_grad_(trainable) for t in (xs, gate_b, up_b, down_b))

    def run() -> torch.Tensor:
        hidden = F.silu(torch._grouped_mm(xs, gate_b, offs=offs)) * torch._grouped_mm(xs, up_b, offs=offs)
        return torch._grouped_mm(hidden, down_b, offs=offs)

    try:
        run()
    except (RuntimeError, TypeError) as error:  # unsupported dtype/arch: no baseline
        print(f"  torch._grouped_mm unavailable: {error}", file=sys.stderr)
        return None
    return run, leaves


def bench_nested_mlp(case: MlpCase, device: torch.device, dtype: torch.dtype, rounds: int) -> list[Row]:
    x, w_gate, w_up, w_down = _mlp_weights(case, device, dtype)
    width = case.d_ff // 2
    fns = {"dense full width": lambda: dense_mlp(x, w_gate, w_up, w_down)}
    if not _has_kernel("nested_mlp", device):
        print(f"  {case.name}: nested_mlp not built for {device.type}", file=sys.stderr)
        return []
    fns["nested_mlp"] = lambda: ops.nested_mlp(x, w_gate, w_up, w_down, width, case.activation)
    check = check_values(
        case.name,
        f"nested_mlp width {width} vs sliced F.linear",
        fns["nested_mlp"](),
        dense_mlp(x, w_gate[:width], w_up[:width], w_down[:, :width]),
    )
    reps = 3 if device.type == "cpu" else 20
    ms = times_ms(fns, device, rounds, WARMUP, calls=reps)
    flops = mlp_flops([(case.tokens, width)], case.hidden, gated=True)
    tflops = flops / ms["nested_mlp"] / 1e9 if device.type == "cuda" else None
    rows = [
        Row(
            case.name,
            f"nested_mlp width {width}",
            "dense full width",
            ms["nested_mlp"],
            ms["dense full width"],
            useful_tflops=tflops,
        )
    ]
    _mark(rows, *check)
    return rows


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'case':<52} {'ours':<28} {'baseline':<30} {'ours ms':>9} {'base ms':>9} "
        f"{'ratio':>6} {'speedup':>7}  target"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        verdict = "" if row.passed is None else ("PASS" if row.passed else "FAIL")
        if row.values_ok is False:
            verdict += " WRONG"
        tflops = f"  {row.useful_tflops:.1f} TFLOP/s" if row.useful_tflops else ""
        if row.peak_pct is not None:
            tflops += f" ({row.peak_pct:.0f}% of mm)"
        print(
            f"{row.case:<52} {row.ours:<28} {row.baseline:<30} {row.ours_ms:9.3f} {row.baseline_ms:9.3f} "
            f"{row.ratio:6.3f} {1 / row.ratio:6.2f}x  {row.target} {verdict}{tflops}"
        )


def _set_peak_pct(rows: list[Row], peak_tflops: float) -> None:
    for row in rows:
        if row.useful_tflops:
            row.peak_pct = 100 * row.useful_tflops / peak_tflops


# Host overhead: each op at decode size (one token) on CPU tensors small enough that the arithmetic
# is negligible, so the time per call is the host's: the Python wrapper, the dispatcher, the
# argument checks and the grouping. On a GPU this cost comes before every kernel launch.
HOST_OVERHEAD_TARGET_US = 30.0
HOST_OVERHEAD_TARGETED = ("nested_linear", "route", "routed_nested_mlp")


def host_overhead_calls() -> dict[str, Callable[[], object]]:
    """One decode-size call of each op (inputs made once), and PyTorch's F.linear for scale."""
    gen = torch.Generator().manual_seed(0)
    hidden, d_ff, widths, heads = 64, 128, [128, 96, 64, 32], 4

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    x, weight, bias = randn(1, hidden), randn(d_ff, hidden), randn(d_ff)
    w_gate, w_up, w_down = randn(d_ff, hidden), randn(d_ff, hidden), randn(hidden, d_ff)
    router_weight, choice = randn(len(widths), hidden), torch.tensor([1])
    q, kv = randn(1, heads, 1, 16), randn(1, heads // 2, 8, 16)
    head_counts = torch.tensor([3])
    return {
        "F.linear (PyTorch, for scale)": lambda: F.linear(x, weight, bias),
        "nested_linear": lambda: ops.nested_linear(x, weight, bias, 96, 48),
        "route": lambda: ops.route(x, router_weight),
        "routed_nested_mlp": lambda: ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths),
        "nested_mlp": lambda: ops.nested_mlp(x, w_gate, w_up, w_down, 96),
        "varhead_attention": lambda: ops.varhead_attention(q, kv, kv, head_counts),
    }


def bench_host_overhead(rounds: int, calls: int = 200) -> list[dict]:
    """Microseconds per call of each op (best of `rounds` samples of `calls` calls: the least
    disturbed by other processes), under inference_mode on one thread, as a decode step runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            best = times_ms(
                host_overhead_calls(), torch.device("cpu"), rounds, 2, calls=calls, statistic="min"
            )
    finally:
        torch.set_num_threads(threads)
    results = []
    for name, ms in best.items():
        targeted = name in HOST_OVERHEAD_TARGETED
        passed = ms * 1e3 <= HOST_OVERHEAD_TARGET_US if targeted else None
        results.append(
            {
                "op": name,
                "us_per_call": round(ms * 1e3, 2),
                "target_us": HOST_OVERHEAD_TARGET_US if targeted else None,
                "passed": passed,
            }
        )
    print(f"host overhead per call, decode size (1 token), CPU, 1 thread, best of {rounds} x {calls} calls")
    for result in results:
        verdict = "" if result["passed"] is None else ("PASS" if result["passed"] else "FAIL")
        target = f"<= {result['target_us']:.0f} us" if result["target_us"] else ""
        print(f"  {result['op']:<32} {result['us_per_call']:8.2f} us  {target:<9} {verdict}")
    print()
    return results


def print_issue_table(rows: list[Row], case: MlpCase, peak_tflops: float) -> None:
    """The issue's summary for one case: per pass, our time, useful TFLOP/s, % of the dense
    matmul rate, speedups over the baselines ("n/a" where one did not run) and route's share."""
    baselines = ("group loop", "dense full width", "torch._grouped_mm full width")
    print(f"{case.name}, bf16, uniform routing; dense bf16 torch.mm: {peak_tflops:.0f} TFLOP/s")
    header = (
        f"{'pass':<10} {'ours ms':>9} {'TFLOP/s':>8} {'% mm':>5} "
        + " ".join(f"{'x vs ' + b:>34}" for b in baselines)
        + f" {'route % of MLP':>15}"
    )
    print(header)
    print("-" * len(header))
    for label, name in (("fwd", case.name), ("fwd+bwd", case.name + " fwd+bwd")):
        mine = [r for r in rows if r.case == name and r.ours == "routed_nested_mlp"]
        if not mine:
            continue
        speedups = []
        for baseline in baselines:
            row = next((r for r in mine if r.baseline == baseline), None)
            speedups.append(f"{1 / row.ratio:.2f}x" if row else "n/a")
        first = mine[0]
        # route's time (measured with the forward) over this pass's MLP time.
        route = next((r for r in rows if r.case == case.name and r.ours == "route"), None)
        share = f"{100 * route.ours_ms / first.ours_ms:.1f}%" if route else "n/a"
        pct = f"{first.peak_pct:.0f}" if first.peak_pct is not None else "n/a"
        tflops = f"{first.useful_tflops:.0f}" if first.useful_tflops else "n/a"
        print(
            f"{label:<10} {first.ours_ms:9.3f} {tflops:>8} {pct:>5} "
            + " ".join(f"{s:>34}" for s in speedups)
            + f" {share:>15}"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds per case (median taken)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--skip-issue-case", action="store_true", help="CUDA: skip the T=8192 d=4096 d_ff=14336 case"
    )
    parser.add_argument("--host-overhead", action="store_true", help="only the host overhead per op call")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"dtype {dtype}, threads {torch.get_num_threads()}, torch {torch.__version__}"
    )

    host_overhead = bench_host_overhead(args.rounds)
    missed = [result["op"] for result in host_overhead if result["passed"] is False]
    if args.host_overhead:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps({"torch": torch.__version__, "host_overhead": host_overhead}, indent=2)
            )
        return 1 if missed else 0
    rows: list[Row] = []
    peak = None
    if device.type == "cuda":
        # The issue's case first (printed at once): the figures that matter most if a time
        # limit cuts the run short.
        peak = measure_matmul_tflops(device, dtype)
        if not args.skip_issue_case:
            issue_rounds = min(args.rounds, 7)
            with torch.inference_mode():
                rows += bench_routed(ISSUE_CASE, device, dtype, issue_rounds)
            rows += bench_routed_train(ISSUE_CASE, device, dtype, issue_rounds, reps=3)
            _set_peak_pct(rows, peak)
            print_issue_table(rows, ISSUE_CASE, peak)
    with torch.inference_mode():
        for linear_case in LINEAR_CASES:
            rows += bench_linear(linear_case, device, dtype, args.rounds)
        rows += bench_routed(ROUTED_CASE, device, dtype, args.rounds)
        rows += bench_routed(DECODE_CASE, device, dtype, args.rounds, targets=False)
        rows += bench_nested_mlp(MlpCase("nested_mlp T=2048 d=576 d_ff=1536"), device, dtype, args.rounds)
    rows += bench_routed_train(ROUTED_CASE, device, dtype, args.rounds)
    if peak is not None:
        _set_peak_pct(rows, peak)
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "device": str(device),
            "dtype": str(dtype),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "matmul_tflops": peak,
            "cases": {
                "linear": [asdict(c) for c in LINEAR_CASES],
                "routed": asdict(ROUTED_CASE),
                "issue": asdict(ISSUE_CASE) if device.type == "cuda" else None,
            },
            "rows": [{**asdict(row), "ratio": row.ratio} for row in rows],
            "host_overhead": host_overhead,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    wrong = [row for row in rows if row.values_ok is False]
    if wrong:
        print(f"{len(wrong)} rows with wrong values (see the checks above)", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
