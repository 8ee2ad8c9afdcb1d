"""The pieces every command shares: the registry that @command fills, one-line usage errors,
the common options (--model, --dtype/--device, --routing, --latency-shape) and argument types.

A command's arguments are (names, add_argument options) pairs:

    @command("hello", arg("--name", default="world"))
    def hello(args: argparse.Namespace) -> None:
        print(f"hello {args.name}")
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from flextron.options import positive_float

Argument = tuple[tuple[str, ...], dict[str, Any]]
# name -> (handler, arguments); filled when a command module is imported
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], tuple[Argument, ...]]] = {}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one stderr line (`flextron CMD: error: ...`), status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def arg(*names: str, **options: Any) -> Argument:
    """One argparse argument, as given to add_argument."""
    return names, options


def command(name: str, *arguments: Argument):
    """Register a command's handler: the decorated function receives the parsed arguments."""

    def register(function: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        COMMANDS[name] = (function, arguments)
        return function

    return register


MODEL = arg("--model", default="default", help="default | FILE.gguf | HF or Flextron directory | ORG/NAME")


def load_options(int8: bool = False) -> tuple[Argument, ...]:
    """--dtype and --device, for every command that loads a model (read by `load`); `int8`: the
    command runs inference only and also takes int8 weights (flextron.model.quantization)."""
    from flextron.model.placement import DEVICES, DTYPES

    return (
        arg(
            "--dtype",
            choices=(*DTYPES, "int8") if int8 else tuple(DTYPES),
            default="float32",
            help="weights and activations (loaded tensor by tensor into this dtype)"
            + ("; int8: int8 weights with per-row scales, fp32 activations" if int8 else ""),
        ),
        arg("--device", choices=DEVICES, default="cpu"),
    )


def load(
    source: str,
    args: argparse.Namespace | None = None,
    *checks: Callable[[Any], None],
    inference: bool = False,
):
    """The model from --model, in the --dtype and on the --device of `args` (when it has them);
    `checks` (functions of the model, raising ValueError) run before it is announced. inference:
    the model is only run (not trained or saved), so its CPU weights move to one huge-page block
    (flextron.model.weight_block)."""
    from flextron.model.loading import load_model_as
    from flextron.model.placement import check_device

    device = check_device(getattr(args, "device", None) or "cpu")
    start = time.perf_counter()
    model = load_model_as(source, getattr(args, "dtype", "float32"), device)
    if inference:
        from flextron.model.weight_block import pack_weights_

        pack_weights_(model)
    for check in checks:
        check(model)
    seconds, millions = time.perf_counter() - start, model.num_parameters() / 1e6
    print(f"loaded {source} in {seconds:.1f}s: {millions:.1f}M parameters", file=sys.stderr)
    return model


def sources(model: str) -> list[str]:
    """The paths of a --model source that outputs must stay clear of (none for the embedded default)."""
    return [] if model == "default" else [model]


def set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _shape_argument(text: str):
    from flextron.latency.shape import shape_argument

    return shape_argument(text)


ROUTING = arg(
    "--routing",
    choices=("auto", "uniform", "static", "dynamic", "sequence"),
    default="auto",
    help="auto: the static router when the model has one, else uniform widths; sequence: per "
    "sequence one of the trained configurations (docs/routers.md)",
)
LATENCY_SHAPE = arg(
    "--latency-shape",
    type=_shape_argument,
    default=None,
    help="the shape budgets refer to, e.g. prefill:1x128 (default: the routers', else the "
    "latency table's first prefill shape)",
)


def parse_numbers(text: str) -> list[float]:
    numbers = [positive_float(part) for part in text.split(",") if part.strip()]
    if not numbers:
        raise argparse.ArgumentTypeError("expected comma-separated positive numbers, got none")
    return numbers


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """BATCHxLENGTH shapes, comma-separated."""
    try:
        shapes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"shapes must look like 1x128,4x128, got {text!r}") from error
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise argparse.ArgumentTypeError(f"shapes must look like 1x128,4x128 (positive sizes), got {text!r}")
    return shapes


def fits_context(flag: str, tokens: int, extra: int = 0) -> Callable[[Any], None]:
    """A `load` check: `tokens` (+ `extra`) must fit the model's context."""
    from flextron.model.requests import check_context

    return lambda model: check_context(model, flag, tokens, extra)


def request_fits(args: argparse.Namespace) -> Callable[[Any], None]:
    """A `load` check: --latency-shape and every --arch configuration fit the model."""
    from flextron.latency.shape import check_latency_shape
    from flextron.model.requests import check_arch_file

    def check(model) -> None:
        check_latency_shape(model, getattr(args, "latency_shape", None))
        check_arch_file(model, getattr(args, "arch", None))

    return check


def preflight_arch(args: argparse.Namespace, single: bool) -> None:
    """Read --arch before anything is loaded: a bad file is a one-line error at once."""
    if getattr(args, "arch", None):
        from flextron.model.requests import load_arch_file, load_one_arch

        (load_one_arch if single else load_arch_file)(args.arch)
