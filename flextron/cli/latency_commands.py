"""Commands for latency targets: profile (the latency lookup table) and train-router."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flextron.cli.arguments import (
    arg,
    command,
    fits_context,
    load,
    load_options,
    parse_shapes,
    request_fits,
    set_threads,
)
from flextron.options import config_from_args, config_options, non_negative_int, positive_float, positive_int
from flextron.routers.config import RouterTrainingConfig


@command(
    "profile",
    arg("--model", required=True, help="a Flextron directory (from convert)"),
    *load_options(int8=True),
    arg("--prefill", type=parse_shapes, default=[(1, 128)], help="BATCHxLENGTH shapes, comma-separated"),
    arg("--decode", type=parse_shapes, default=[(1, 256)], help="BATCHxCONTEXT shapes, comma-separated"),
    arg("--repeats", type=positive_int, default=9, help="timed repeats per component (the median is kept)"),
    arg(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads (default: torch's); use the same later",
    ),
    arg(
        "--check",
        type=non_negative_int,
        default=10,
        help="random configurations: predicted vs measured (0: skip)",
    ),
    arg(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time (one thread only): latency on a dedicated core of a shared machine",
    ),
    arg("--json", default=None, help="write the check rows here"),
)
def profile(args: argparse.Namespace) -> None:
    from flextron.io.atomic import write_json_atomic
    from flextron.io.outputs import check_output_file
    from flextron.latency.profiling import check_table, profile_latency
    from flextron.latency.table import LUT_FILE
    from flextron.model.checkpoint import require_flextron_dir

    check_output_file(args.json, "--json")
    set_threads(args.threads)
    directory = require_flextron_dir(args.model)
    check_output_file(directory / LUT_FILE, "--model")
    longest = max([length for _, length in args.prefill] + [length + 1 for _, length in args.decode])
    model = load(args.model, args, fits_context("--prefill/--decode length", longest), inference=True)
    table = profile_latency(
        model,
        args.prefill,
        args.decode,
        repeats=args.repeats,
        progress=lambda text: print(text, file=sys.stderr),
        clock=args.clock,
    )
    written = table.save(directory)
    print(f"latency table for {table.device_name} written to {written}")
    for entry in table.entries:
        low, high = table.latency_range(model.config, entry.shape)
        print(
            f"{entry.phase:>7} batch {entry.batch} length {entry.length}: full model {high:.2f} ms, "
            f"smallest sub-network {low:.2f} ms, fixed {entry.fixed_ms:.2f} ms"
        )
    table.check_monotone()
    rows = []
    for entry in table.entries if args.check > 0 else []:
        checked = check_table(model, table, args.check, entry.shape, repeats=args.repeats)
        errors = [100 * row["error"] for row in checked]
        print(
            f"{entry.phase:>7} batch {entry.batch} length {entry.length}: predicted vs measured on "
            f"{args.check} random configurations: errors (%) {', '.join(f'{e:+.1f}' for e in errors)}; "
            f"max |error| {max(abs(e) for e in errors):.1f}%"
        )
        rows += checked
    if rows:
        table.record_check(rows)  # stored in the table, with a warning when it is off by more than 10%
        table.save(directory)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.json), {"device": table.device_name, "checks": rows})


@command(
    "train-router",
    arg("--model", required=True, help="a Flextron directory with a latency table (flextron profile)"),
    *config_options(RouterTrainingConfig),
    arg(
        "--tau",
        type=positive_float,
        nargs=2,
        default=(1.0, 0.1),
        metavar=("START", "END"),
        help="Gumbel-softmax temperature, annealed exponentially from START to END",
    ),
    arg("--threads", type=positive_int, default=None),
    arg("--log", default=None, help="write the per-step log here (JSON)"),
    load_options()[0],  # --dtype: the dtype calibration runs in (routers train on the CPU, in float32)
)
def train_router(args: argparse.Namespace) -> None:
    from flextron.io.atomic import write_json_atomic
    from flextron.io.outputs import check_output_file
    from flextron.model.checkpoint import require_flextron_dir
    from flextron.routers import ROUTERS_META_FILE, train_routers

    config = config_from_args(RouterTrainingConfig, args, tau_start=args.tau[0], tau_end=args.tau[1])
    if args.dtype != "float32" and config.mode != "calibrate":
        # Training updates fp32 parameters; calibration only runs forwards, so it can run in the
        # dtype (and on the latency table) that inference will use.
        raise ValueError(f"--dtype {args.dtype}: only --mode calibrate; routers train in float32")
    check_output_file(args.log, "--log")
    set_threads(args.threads)
    directory = require_flextron_dir(args.model)
    check_output_file(directory / ROUTERS_META_FILE, "--model")
    model = load(
        args.model, args, fits_context("--seq-len", config.seq_len), request_fits(args), inference=True
    )
    result = train_routers(model, directory, config)
    for message in result.messages:
        print(message)
    if args.log:
        write_json_atomic(Path(args.log), result.logs)
