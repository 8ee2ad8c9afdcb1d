"""The `flextron` command line (also `python -m flextron`).

Each command is a handler in one of the command-group modules (model_commands,
inference_commands, latency_commands, training_commands), registered there with
`@command(name, *arguments)`: it parses, calls one library function and prints.  The table
below names every command and its module, so `flextron --help` lists them without importing any
of them (and so without torch); a command's module is imported only when it runs.

Model sources (--model): "default" (the embedded SmolLM2-135M-Instruct), a .gguf file, a
Hugging Face directory, a Flextron directory (from convert / save_pretrained), or a hub id
ORG/NAME (from the Hugging Face cache, else downloaded; HF_HUB_OFFLINE=1: the cache only).

Layer 6 (the top): may import every flextron package.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from flextron.cli.arguments import COMMANDS, OneLineParser

# name -> (module, one-line help), in the order --help lists them
COMMAND_TABLE: dict[str, tuple[str, str]] = {
    "info": ("model_commands", "show a model's configuration, sub-network choices and parameters per budget"),
    "convert": (
        "model_commands",
        "rank neurons/heads on calibration text, permute, save a Flextron directory",
    ),
    "choose-budgets": (
        "model_commands",
        "choose each budget's configuration by calibration loss; saves budget_configs.json",
    ),
    "corpus": (
        "model_commands",
        "build the general-English corpus (train, validation and test JSONL) from installed Debian packages",
    ),
    "eval": ("inference_commands", "perplexity at several budgets or configurations: table, JSON, PNG plot"),
    "generate": ("inference_commands", "answer a prompt at a budget, streaming the tokens"),
    "export": (
        "inference_commands",
        "write one sub-network as a standalone model: Hugging Face, Flextron or GGUF directory",
    ),
    "bench": (
        "inference_commands",
        "prefill and decode tokens/s at several budgets, optionally against transformers",
    ),
    "profile": (
        "latency_commands",
        "measure the latency lookup table of every MLP width and head count; save it in the model dir",
    ),
    "train-router": (
        "latency_commands",
        "train a static or dynamic router: surrogate-model loop then joint fine-tuning, or e2e",
    ),
    "train": (
        "training_commands",
        "elastic continued training with distillation from the frozen original (torchrun-ready)",
    ),
    "demo": (
        "training_commands",
        "the embedded SmolLM2 end to end: convert, perplexity per budget, plot, answers",
    ),
}


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The command named on the line (the first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of `commands` (default: all) are filled in, which imports their
    modules.  The others are listed with their help only."""
    wanted = set(COMMAND_TABLE if commands is None else commands)
    parser = OneLineParser(prog="flextron", description="Flextron: many-in-one elastic LLMs")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help) in COMMAND_TABLE.items():
        sub = subparsers.add_parser(name, help=help, description=help)
        if name in wanted:
            importlib.import_module(f"flextron.cli.{module}")  # registers the module's commands
            function, arguments = COMMANDS[name]
            for names, options in arguments:
                sub.add_argument(*names, **options)
            sub.set_defaults(function=function)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input exits with status 2 and a one-line error."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = _chosen_command(argv)
    parser = build_parser([chosen] if chosen in COMMAND_TABLE else [])
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # a usage error (already printed, one line) or --help
        return exit.code if isinstance(exit.code, int) else 2
    try:
        if isinstance(getattr(args, "model", None), str):
            from flextron.io.hub import resolve_model_dir

            args.model = resolve_model_dir(args.model)  # a hub id becomes its cached directory
        with warnings.catch_warnings():
            # Our warnings (a budget out of reach, a table from another device) as one line each,
            # like the errors, not with the source line that raised them.
            warnings.showwarning = lambda message, category, *_: print(
                f"flextron {args.command}: warning: {message}", file=sys.stderr
            )
            args.function(args)
    except (ValueError, OSError) as error:
        # Bad input, unreadable or unwritable files (a full disk, a read-only place): one line.
        message = (
            str(error)
            if isinstance(error, ValueError) or not error.strerror
            else (f"{error.strerror}: {error.filename}" if error.filename else error.strerror)
        )
        print(f"flextron {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    return 0


def command_options(name: str) -> list[str]:
    """A command's option strings and positional names, in declaration order (its surface)."""
    build_parser([name])  # imports the command's module, which registers its arguments
    return [flag for names, _ in COMMANDS[name][1] for flag in names]
