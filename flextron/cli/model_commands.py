"""Commands about a model itself: info, convert, choose-budgets, and the corpus they calibrate on."""

from __future__ import annotations

import argparse
import json
import sys

from flextron.cli.arguments import MODEL, arg, command, fits_context, load, load_options, sources
from flextron.model.budget_configs import CalibrationConfig
from flextron.model.config import REPORTED_BUDGETS, ArchConfig
from flextron.options import config_from_args, config_options, non_negative_int, parse_budgets, positive_int

CALIBRATION_TEXT = "calibration text: builtin | file | dir | .jsonl | saved dataset"


@command("info", MODEL, arg("--budgets", type=parse_budgets, default=list(REPORTED_BUDGETS)))
def info(args: argparse.Namespace) -> None:
    from flextron import ops

    model = load(args.model)
    config = model.config
    print(json.dumps(config.to_dict(), indent=2))
    print(f"MLP width choices: {config.mlp_choices()}")
    print(f"head choices (whole KV groups of {config.group_size}): {config.head_choices()}")
    print(f"converted (importance scores present): {bool(model.importance)}")
    for budget in args.budgets:
        arch = model.arch_for_budget(budget)
        print(f"budget {budget:g}: {arch.summary()}, {model.num_parameters(arch) / 1e6:.1f}M parameters")
    print("kernels:", {name: ops.backends(name) for name in ops.OP_NAMES})


@command(
    "convert",
    MODEL,
    *load_options(),
    arg("--out", required=True, help="output directory (new or empty; see --overwrite)"),
    arg("--overwrite", action="store_true", help="replace a non-empty --out directory"),
    arg("--calib", default="builtin", help=CALIBRATION_TEXT),
    arg("--samples", type=positive_int, default=32, help="calibration blocks"),
    *config_options(CalibrationConfig),
    arg(
        "--budget-samples",
        type=non_negative_int,
        default=8,
        help="calibration blocks for choosing the budgets' configurations (0: keep the fixed rule)",
    ),
)
def convert(args: argparse.Namespace) -> None:
    from flextron.conversion.ranking import convert as convert_model
    from flextron.data.blocks import evenly_spaced, load_blocks
    from flextron.io.outputs import check_output_dir, staged_output
    from flextron.model.checkpoint import save_pretrained

    config = config_from_args(CalibrationConfig, args)
    check_output_dir(args.out, overwrite=args.overwrite, sources=sources(args.model))
    model = load(args.model, args, fits_context("--seq-len", config.seq_len))
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: calibration text cannot be tokenized")
    blocks = load_blocks(model.tokenizer, args.calib, config.seq_len, args.samples, split="train")
    print(f"calibrating on {blocks.shape[0]} x {blocks.shape[1]} tokens", file=sys.stderr)
    convert_model(model, blocks, config)
    if args.budget_samples > 0:
        _choose_budgets(model, evenly_spaced(blocks, args.budget_samples), config, args.calib)
    with staged_output(args.out, args.overwrite) as staged:
        save_pretrained(model, staged)
    print(f"saved the converted model (and importance.safetensors) to {args.out}")


def _choose_budgets(model, blocks, config: CalibrationConfig, source: str) -> None:
    """Choose and print each budget's configuration."""
    from flextron.conversion.budget_search import choose_budget_configs

    print(f"choosing budget configurations on {blocks.shape[0]} x {blocks.shape[1]} tokens", file=sys.stderr)
    model.budget_configs = choose_budget_configs(model, blocks, config, source)
    for entry in model.budget_configs.entries:
        shape = ArchConfig.from_dict(entry["arch"]).summary()
        print(
            f"budget {entry['budget']:g}: {shape}, {entry['parameters'] / 1e6:.1f}M parameters, "
            f"calibration loss {entry['loss']:.3f} (fixed rule {entry['rule_loss']:.3f})"
        )


@command(
    "choose-budgets",
    arg("--model", required=True, help="a Flextron directory (from convert or train)"),
    arg("--data", default="builtin", help=CALIBRATION_TEXT),
    arg("--samples", type=positive_int, default=8, help="calibration blocks"),
    *config_options(CalibrationConfig),
)
def choose_budgets(args: argparse.Namespace) -> None:
    from flextron.data.blocks import load_blocks
    from flextron.io.outputs import check_output_file
    from flextron.model.budget_configs import FILE
    from flextron.model.checkpoint import require_flextron_dir

    config = config_from_args(CalibrationConfig, args)
    directory = require_flextron_dir(args.model)
    check_output_file(directory / FILE, "--model")
    model = load(args.model, None, fits_context("--seq-len", config.seq_len))
    blocks = load_blocks(model.tokenizer, args.data, config.seq_len, args.samples, split="train")
    _choose_budgets(model, blocks, config, args.data)
    model.budget_configs.save(args.model, model, model.config)
    print(f"saved {args.model}/budget_configs.json")


@command("corpus", arg("--out", required=True, help="a new directory"))
def corpus(args: argparse.Namespace) -> None:
    from flextron.data.corpus import build_corpus
    from flextron.io.outputs import check_output_dir

    check_output_dir(args.out)
    manifest = build_corpus(args.out)
    for name, entry in manifest["files"].items():
        print(
            f"{name}: {entry['documents']} documents, {entry['words']} words ({entry['licence']}, "
            f"Debian package {entry['package']})"
        )
