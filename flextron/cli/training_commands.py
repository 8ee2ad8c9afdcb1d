"""Commands that train: train (elastic distillation) and demo (the embedded model end to end)."""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

from flextron.cli.arguments import arg, command, fits_context, load, set_threads
from flextron.demo import DemoConfig
from flextron.options import config_from_args, config_options, float_in, non_negative_int, positive_int
from flextron.train.trainer import TrainConfig

fraction_float = float_in(0.0, 1.0, high_open=True)


@command(
    "train",
    arg("--model", default="default", help="a converted Flextron directory (flextron convert) or any source"),
    arg("--out", required=True, help="run directory: metrics.jsonl, metrics.png, checkpoints/"),
    arg("--data", default="builtin", help="builtin | file | dir | .jsonl | saved dataset"),
    arg("--seq-len", type=positive_int, default=256, help="tokens per training block"),
    arg(
        "--val-fraction",
        type=fraction_float,
        default=0.1,
        help="validation share (builtin: its held-out split)",
    ),
    arg("--val-blocks", type=non_negative_int, default=8, help="at most this many validation blocks"),
    *config_options(TrainConfig),
    arg("--resume", action="store_true", help="continue from OUT/checkpoints/latest.json"),
    arg(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its metrics and checkpoints)",
    ),
    arg(
        "--stop-after",
        type=positive_int,
        default=None,
        help="stop (checkpointed) after N steps; --resume later",
    ),
    arg("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available"),
    arg("--fsdp", action="store_true", help="shard with FSDP2 (under torchrun)"),
    arg(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's; 1 is faster when other jobs share the cores)",
    ),
)
def train(args: argparse.Namespace) -> None:
    from flextron.train import NonFiniteLossError, init_distributed
    from flextron.train import train as train_model
    from flextron.train.distributed import shutdown_distributed
    from flextron.train.setup import check_run_request, training_data

    check_run_request(args.out, args.resume, args.overwrite, args.steps, args.stop_after)
    config = config_from_args(TrainConfig, args)
    set_threads(args.threads)
    context = init_distributed(args.device, args.fsdp)
    warn_if_bf16_is_slow(config.bf16, context.device.type)
    try:
        model = load(args.model, None, fits_context("--seq-len", args.seq_len, 1))
        data = training_data(
            model,
            args.model,
            args.data,
            seq_len=args.seq_len,
            val_fraction=args.val_fraction,
            val_blocks=args.val_blocks,
            context=context,
        )
        teacher = copy.deepcopy(model)  # the frozen original: also the teacher of a resumed run
        try:
            result = train_model(
                model,
                teacher,
                data,
                config,
                args.out,
                resume=args.resume,
                context=context,
                stop_after=args.stop_after,
                overwrite=args.overwrite,
            )
        except NonFiniteLossError as error:
            raise SystemExit(f"flextron train: error: {error}") from error
    finally:
        shutdown_distributed()
    if context.is_main:
        print(
            f"trained {result['tokens']} tokens in {result['seconds']:.0f}s; validation perplexity: "
            + ", ".join(f"budget {b}: {ppl:.2f}" for b, ppl in result["val"].items())
        )
        final = Path(args.out) / "checkpoints" / f"step-{result['steps']:06d}"
        print(f"checkpoint (a Flextron model directory): {final}")


def warn_if_bf16_is_slow(bf16: bool, device_type: str) -> None:
    """Why: a CPU without AVX-512 BF16 widens every bf16 product to fp32 and converts back,
    so --bf16 there is several times slower than fp32 (the recipe then trains in fp32)."""
    from flextron.ops.info import bf16_is_fast

    if bf16 and device_type == "cpu" and not bf16_is_fast("cpu"):
        warnings.warn(
            "this CPU has no AVX-512 BF16, so --bf16 runs slower than fp32 here: leave it out", stacklevel=2
        )


@command(
    "demo",
    arg("--out", default="runs/demo", help="directory for the converted model, table, JSON and plot"),
    *config_options(DemoConfig),
)
def demo(args: argparse.Namespace) -> None:
    from flextron.demo import run_demo
    from flextron.io.outputs import check_output_dir

    config = config_from_args(DemoConfig, args)
    check_output_dir(args.out, overwrite=True)  # a cache: reused, never replaced wholesale
    run_demo(Path(args.out), config)
