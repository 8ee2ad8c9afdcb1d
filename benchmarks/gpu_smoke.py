"""A 30-second first look at the CUDA kernels: every op once per path, synchronised, with the
maximum error against an fp32 PyTorch computation (flextron.ops.reference) printed as it goes.

    python benchmarks/gpu_smoke.py [--json smoke.json]
    python benchmarks/gpu_smoke.py --device cpu   # the stand-in of gpu_check.sh --rehearse

Run first by benchmarks/gpu_check.sh, before the test suite: each line is flushed before the
next op starts, so a crash or a hang (a bad index, a device-side assert, a kernel that never
ends) is pinned to the op and path printed last. Paths are forced with the documented
switches: FLEXTRON_PREFIX_GEMM (nested_linear, nested_mlp) and FLEXTRON_ROUTED_GEMM
(routed_nested_mlp: the 3.x kernels forced, then the 2.x ones). Exit status 1 when an error
exceeds its tolerance or an op raises.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from flextron import _C, ops
from flextron.ops import reference

# Relative error (max|ours - fp32| / max|fp32|) allowed: a few roundings of the dtype; a wrong
# tile, group or band gives O(1).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
RESULTS: list[dict] = []
DEVICE = torch.device("cuda")  # --device cpu runs the same cases on the CPU kernels
DTYPES = (torch.bfloat16, torch.float32)


def relative_error(ours, exact) -> float:
    """Worst max|ours - exact| / max|exact| over tensors (NaN counts as infinite)."""
    ours = ours if isinstance(ours, (list, tuple)) else [ours]
    exact = exact if isinstance(exact, (list, tuple)) else [exact]
    worst = 0.0
    for mine, reference_value in zip(ours, exact, strict=True):
        reference_value = reference_value.float()
        scale = reference_value.abs().max().item() if reference_value.numel() else 1.0
        error = (mine.float() - reference_value).abs().max().item() if mine.numel() else 0.0
        worst = max(worst, error / (scale or 1.0) if error == error else float("inf"))
    return worst


def set_env(env: dict[str, str | None]) -> None:
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def run(
    op: str, path: str, dtype: torch.dtype, env: dict[str, str | None], fn: Callable[..., tuple], *args
) -> None:
    """fn(*args) -> (ours, fp32 result): runs it under `env` (None unsets a variable),
    synchronised, and records the error."""
    print(f"{op:<26} {path:<42} {str(dtype).removeprefix('torch.'):<9}", end=" ", flush=True)
    saved = {name: os.environ.get(name) for name in env}
    set_env(env)
    start = time.perf_counter()
    record = {"op": op, "path": path, "dtype": str(dtype), "env": env}
    try:
        ours, exact = fn(*args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        error = relative_error(ours, exact)
        record.update(error=error, ok=error <= TOLERANCE[dtype])
    except Exception as exc:  # noqa: BLE001 - a failing op is a result, the next ones still run
        record.update(error=None, ok=False, exception=f"{type(exc).__name__}: {exc}".splitlines()[0])
        traceback.print_exc()
    finally:
        set_env(saved)
    record["seconds"] = time.perf_counter() - start
    error = "raised" if record["error"] is None else f"{record['error']:.2e}"
    print(f"rel err {error:>9}  {'ok' if record['ok'] else 'FAIL'}  {record['seconds']:.2f} s", flush=True)
    RESULTS.append(record)


def randn(*shape, dtype, scale=1.0, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)


def grads_of(fn, tensors, grad_out):
    """(output, gradients w.r.t. the tensors that are not None) of fn(*leaves)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [leaf for leaf in leaves if leaf is not None], grad_out.to(y.dtype))
    return [y.detach(), *grads]


def as_fp32(tensors):
    return [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def prefix_gemm_paths() -> tuple[str, ...]:
    """FLEXTRON_PREFIX_GEMM's values; the CPU kernels have one path."""
    return ("auto", "cutlass", "cublas") if DEVICE.type == "cuda" else ("auto",)


def linear_case(x, weight, bias):
    return (
        ops.nested_linear(x, weight, bias, 1280, 1000),
        reference.nested_linear(x.float(), weight.float(), bias.float(), 1280, 1000),
    )


def smoke_linear() -> None:
    for dtype in DTYPES:
        for rows, label in ((2048, "2048 rows"), (4, "decode 4 rows")):
            x = randn(rows, 1032, dtype=dtype, seed=1)
            weight = randn(1536, 1024, dtype=dtype, scale=1024**-0.5, seed=2)
            bias = randn(1536, dtype=dtype, seed=3)
            for gemm in prefix_gemm_paths():
                run(
                    "nested_linear",
                    f"{label}, {gemm}",
                    dtype,
                    {"FLEXTRON_PREFIX_GEMM": gemm},
                    linear_case,
                    x,
                    weight,
                    bias,
                )


def mlp_case(tensors, grad_out):
    return (
        grads_of(lambda *t: ops.nested_mlp(*t, 1352, "swiglu"), tensors, grad_out),
        grads_of(lambda *t: reference.nested_mlp(*t, 1352, "swiglu"), as_fp32(tensors), grad_out.float()),
    )


def smoke_mlp() -> None:
    for dtype in DTYPES:
        tensors = [
            randn(2048, 520, dtype=dtype, seed=4),
            randn(2048, 520, dtype=dtype, scale=520**-0.5, seed=5),
            randn(2048, 520, dtype=dtype, scale=520**-0.5, seed=6),
            randn(520, 2048, dtype=dtype, scale=2048**-0.5, seed=7),
        ]
        grad_out = randn(2048, 520, dtype=dtype, seed=8)
        for gemm in prefix_gemm_paths():
            run(
                "nested_mlp fwd+bwd",
                f"width 1352, {gemm}",
                dtype,
                {"FLEXTRON_PREFIX_GEMM": gemm},
                mlp_case,
                tensors,
                grad_out,
            )


def route_case(logits):
    """probs against the reference; choice, perm, inv_perm and offsets must be bit-equal."""
    ours = ops.route(logits)
    theirs = reference.route(logits.float(), None, None, 1.0, False)
    for name, mine, exact in zip(
        ("choice", "perm", "inv_perm", "offsets"), (ours[0], *ours[2:]), (theirs[0], *theirs[2:]), strict=True
    ):
        if not torch.equal(mine.cpu(), exact.cpu()):
            raise AssertionError(f"{name} differs from the reference")
    return ours[1], theirs[1]


def smoke_route() -> None:
    for dtype in DTYPES:
        for tokens, choices in ((8192, 4), (1000, 40)):
            run(
                "route",
                f"T={tokens} C={choices}",
                dtype,
                {},
                route_case,
                randn(tokens, choices, dtype=dtype, seed=9),
            )


def routed_case(tensors, choice, widths, grad_out):
    def ours(x, w_gate, w_up, w_down, scale):
        return ops.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale, "swiglu")

    def theirs(x, w_gate, w_up, w_down, scale):
        return reference.routed_nested_mlp(x, w_gate, w_up, w_down, choice, widths, scale, "swiglu")

    return grads_of(ours, tensors, grad_out), grads_of(theirs, as_fp32(tensors), grad_out.float())


def smoke_routed() -> None:
    # Multi-tile (hundreds of tiles per launch), then K tails (D = 72, widths 200/136/40).
    cases = [
        (4096, 512, 2048, [2048, 1536, 1024, 512], "multi-tile"),
        (333, 72, 200, [200, 136, 40], "K tails"),
    ]
    sm90 = (
        DEVICE.type == "cuda"
        and bool(_C.build_info().get("sm90_kernels"))
        and torch.cuda.get_device_capability() == (9, 0)
    )
    if DEVICE.type == "cpu":
        cases = cases[1:]  # the multi-tile case is about CUDA's tile scheduling, and slow here
    for tokens, hidden, ffn, widths, label in cases:
        for dtype in DTYPES:
            tensors = [
                randn(tokens, hidden, dtype=dtype, seed=10),
                randn(ffn, hidden, dtype=dtype, scale=hidden**-0.5, seed=11),
                randn(ffn, hidden, dtype=dtype, scale=hidden**-0.5, seed=12),
                randn(hidden, ffn, dtype=dtype, scale=ffn**-0.5, seed=13),
            ]
            gen = torch.Generator(device=DEVICE).manual_seed(14)
            choice = torch.randint(0, len(widths), (tokens,), device=DEVICE, generator=gen)
            tensors.append(torch.rand(tokens, device=DEVICE, generator=gen).to(dtype))  # scale
            grad_out = randn(tokens, hidden, dtype=dtype, seed=15)
            if dtype == torch.float32 or DEVICE.type == "cpu":
                paths = [("masked" if DEVICE.type == "cuda" else "cpu", {})]
            else:
                paths = [("sm90", {"FLEXTRON_ROUTED_GEMM": "sm90"})] if sm90 else []
                paths.append(("2.x", {"FLEXTRON_ROUTED_GEMM": "sm80"}))
            for name, env in paths:
                run(
                    "routed_nested_mlp fwd+bwd",
                    f"{label} T={tokens} D={hidden}, {name}",
                    dtype,
                    env,
                    routed_case,
                    tensors,
                    choice,
                    widths,
                    grad_out,
                )


def attention_case(q, k, v, grad_out, heads, causal):
    return (
        grads_of(lambda *t: ops.varhead_attention(*t, heads, causal), [q, k, v], grad_out),
        grads_of(
            lambda *t: reference.varhead_attention(*t, heads, causal), as_fp32([q, k, v]), grad_out.float()
        ),
    )


def smoke_attention() -> None:
    # (label, q heads, kv heads, Sq, Sk, causal, heads per sequence)
    cases = [
        ("prefill causal, scattered buckets", 8, 2, 256, 256, True, [8, 2, 8, 5]),
        ("chunked GQA prefill (mask)", 8, 2, 128, 384, True, [8, 8, 4, 4]),
        ("decode", 8, 2, 1, 384, True, [8, 3, 8, 8]),
    ]
    for dtype in DTYPES:
        for label, hq, hkv, sq, sk, causal, heads in cases:
            q_shape, kv_shape = (len(heads), hq, sq, 64), (len(heads), hkv, sk, 64)
            q, k, v, grad_out = (
                randn(*shape, dtype=dtype, seed=16 + i)
                for i, shape in enumerate((q_shape, kv_shape, kv_shape, q_shape))
            )
            run(
                "varhead_attention fwd+bwd",
                label,
                dtype,
                {},
                attention_case,
                q,
                k,
                v,
                grad_out,
                torch.tensor(heads),
                causal,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="bf16 only (gpu_check.sh --rehearse --fast)")
    args = parser.parse_args(argv)
    global DEVICE, DTYPES
    DEVICE = torch.device(args.device)
    DTYPES = DTYPES[:1] if args.quick else DTYPES
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device")
    info = _C.build_info()
    device_name = (
        f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
        if DEVICE.type == "cuda"
        else "CPU (stand-in)"
    )
    print(f"{device_name}, torch {torch.__version__}, build {info}", flush=True)
    start = time.perf_counter()
    for smoke in (smoke_linear, smoke_mlp, smoke_route, smoke_routed, smoke_attention):
        smoke()
    failed = [r for r in RESULTS if not r["ok"]]
    print(f"{len(RESULTS)} runs, {len(failed)} failed, {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"build": info, "device": device_name, "results": RESULTS},
                indent=2,
                default=str,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
