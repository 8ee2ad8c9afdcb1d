"""The `flextron` command line (also `python -m flextron`).

Each subcommand is one function registered with @command, its arguments declared in the
decorator:

    @command("hello", "say hello", arg("--name", default="world"))
    def hello(args: argparse.Namespace) -> None:
        print(f"hello {args.name}")

Model sources (--model): "default" (the embedded SmolLM2-135M-Instruct), a .gguf file, a
Hugging Face directory, a Flextron directory (from convert / save_pretrained), or a hub id
ORG/NAME (from the Hugging Face cache, else downloaded; HF_HUB_OFFLINE=1: the cache only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flextron.budget_configs import CalibrationConfig
from flextron.cliargs import (
    OneLineParser,
    budget_float,
    config_from_args,
    config_options,
    float_in,
    non_negative_float,
    non_negative_int,
    parse_budgets,
    positive_float,
    positive_int,
)
from flextron.config import REPORTED_BUDGETS, ArchConfig
from flextron.demo import DemoConfig
from flextron.export import DEFAULT_MAX_SHARD_SIZE
from flextron.export import FORMATS as EXPORT_FORMATS
from flextron.train.trainer import TrainConfig

fraction_float = float_in(0.0, 1.0, high_open=True)

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str, tuple]] = {}


def arg(*names: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argparse argument, as given to add_argument."""
    return names, options


def command(name: str, help: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]):
    """Register a subcommand: the decorated function receives the parsed arguments."""

    def register(function: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        COMMANDS[name] = (function, help, arguments)
        return function

    return register


MODEL = arg("--model", default="default", help="default | FILE.gguf | HF or Flextron directory | ORG/NAME")


def load_options() -> tuple[tuple[tuple[str, ...], dict[str, Any]], ...]:
    """--dtype and --device, for every command that loads a model (read by _load)."""
    from flextron.hub import DEVICES, DTYPES

    return (
        arg(
            "--dtype",
            choices=tuple(DTYPES),
            default="float32",
            help="weights and activations (loaded tensor by tensor into this dtype)",
        ),
        arg("--device", choices=DEVICES, default="cpu"),
    )


def _load(source: str, args: argparse.Namespace | None = None, *checks: Callable[[Any], None]):
    """The model from --model, in the --dtype and on the --device of `args` (when it has them);
    `checks` (functions of the model, raising ValueError) run before it is announced, so that a
    request the model cannot serve ends in one line."""
    from flextron.hub import check_device, parse_dtype
    from flextron.loading import load_model

    dtype = parse_dtype(getattr(args, "dtype", "float32"))
    device = check_device(getattr(args, "device", None) or "cpu")
    start = time.perf_counter()
    model = load_model(source, dtype, device)
    for check in checks:
        check(model)
    seconds, millions = time.perf_counter() - start, model.num_parameters() / 1e6
    print(f"loaded {source} in {seconds:.1f}s: {millions:.1f}M parameters", file=sys.stderr)
    return model


def _sources(model: str) -> list[str]:
    """The paths of a --model source that outputs must stay clear of (none for the embedded default)."""
    return [] if model == "default" else [model]


def _fits_context(flag: str, tokens: int, extra: int = 0) -> Callable[[Any], None]:
    """A _load check: `tokens` (+ `extra`) must fit the model's context."""

    def check(model) -> None:
        context = model.config.max_position_embeddings
        if tokens + extra > context:
            raise ValueError(
                f"{flag} {tokens} does not fit the model's context of {context} tokens"
                + (f" (with {extra} more)" if extra else "")
            )

    return check


def _shape_fits(args: argparse.Namespace) -> Callable[[Any], None]:
    """A _load check: --latency-shape within the model's context (a decode step adds one token)."""

    def check(model) -> None:
        shape = getattr(args, "latency_shape", None)
        if shape is not None:
            _fits_context("--latency-shape length", shape.length, int(shape.phase == "decode"))(model)

    return check


def _arch_fits(args: argparse.Namespace) -> Callable[[Any], None]:
    """A _load check: every --arch configuration fits the model."""

    def check(model) -> None:
        if getattr(args, "arch", None):
            from flextron.evaluate import load_arch_file

            for name, (_, arch) in load_arch_file(args.arch).items():
                try:
                    arch.validate(model.config)
                except ValueError as error:
                    raise ValueError(f"--arch {args.arch} ({name}): {error}") from error

    return check


def _choose_arch(model, args: argparse.Namespace):
    """The configuration from --arch (a JSON file), else a Selection from --budget / --latency-ms."""
    from flextron.evaluate import load_one_arch

    if getattr(args, "arch", None):
        return load_one_arch(args.arch)
    selection = _resolver(model, args).select(args.budget, args.latency_ms, args.routing)
    print(selection.describe(), file=sys.stderr)
    return selection


# ---- budgets and latency targets (routers)


def _shape_argument(text: str):
    from flextron.routers.shape import shape_argument

    return shape_argument(text)


ROUTING = arg(
    "--routing",
    choices=("auto", "uniform", "static", "dynamic"),
    default="auto",
    help="auto: the static router when the model has one, else uniform widths",
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


def _preflight_arch(args: argparse.Namespace, single: bool) -> None:
    """Read --arch before anything is loaded: a bad file is a one-line error at once."""
    if getattr(args, "arch", None):
        from flextron.evaluate import load_arch_file

        archs = load_arch_file(args.arch)
        if single and len(archs) != 1:
            raise ValueError(f"{args.arch}: expected one configuration, found {len(archs)}")


def _resolver(model, args: argparse.Namespace):
    """Budget resolution with the model directory's latency table and routers (when it has them)."""
    from flextron.routers import BudgetResolver

    directory = args.model if Path(args.model).is_dir() else None
    return BudgetResolver(model, directory, getattr(args, "latency_shape", None))


# ---- commands


@command(
    "info",
    "show a model's configuration, sub-network choices and parameters per budget",
    MODEL,
    arg("--budgets", type=parse_budgets, default=list(REPORTED_BUDGETS)),
)
def info(args: argparse.Namespace) -> None:
    from flextron import ops

    model = _load(args.model)
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
    "rank neurons/heads on calibration text, permute, save a Flextron directory",
    MODEL,
    *load_options(),
    arg("--out", required=True, help="output directory (new or empty; see --overwrite)"),
    arg("--overwrite", action="store_true", help="replace a non-empty --out directory"),
    arg("--calib", default="builtin", help="calibration text: builtin | file | dir | .jsonl | saved dataset"),
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
    from flextron.checkpoint import save_pretrained
    from flextron.convert import convert as convert_model
    from flextron.data import evenly_spaced, load_blocks
    from flextron.outputs import check_output_dir, staged_output

    config = config_from_args(CalibrationConfig, args)
    check_output_dir(args.out, overwrite=args.overwrite, sources=_sources(args.model))
    model = _load(args.model, args, _fits_context("--seq-len", config.seq_len))
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
    from flextron.budget_search import choose_budget_configs

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
    "choose each budget's configuration by calibration loss; saves budget_configs.json",
    arg("--model", required=True, help="a Flextron directory (from convert or train)"),
    arg("--data", default="builtin", help="calibration text: builtin | file | dir | .jsonl | saved dataset"),
    arg("--samples", type=positive_int, default=8, help="calibration blocks"),
    *config_options(CalibrationConfig),
)
def choose_budgets(args: argparse.Namespace) -> None:
    from flextron.budget_configs import FILE
    from flextron.data import load_blocks
    from flextron.outputs import check_output_file

    config = config_from_args(CalibrationConfig, args)
    directory = _flextron_dir(args.model)
    check_output_file(directory / FILE, "--model")
    model = _load(args.model, None, _fits_context("--seq-len", config.seq_len))
    blocks = load_blocks(model.tokenizer, args.data, config.seq_len, args.samples, split="train")
    _choose_budgets(model, blocks, config, args.data)
    model.budget_configs.save(args.model, model, model.config)
    print(f"saved {args.model}/budget_configs.json")


@command(
    "corpus",
    "build the general-English corpus (train + held-out JSONL) from installed Debian packages",
    arg("--out", required=True, help="a new directory"),
)
def corpus(args: argparse.Namespace) -> None:
    from flextron.corpus import build_corpus
    from flextron.outputs import check_output_dir

    check_output_dir(args.out)
    manifest = build_corpus(args.out)
    for name, entry in manifest["files"].items():
        print(
            f"{name}: {entry['documents']} documents, {entry['words']} words ({entry['licence']}, "
            f"Debian package {entry['package']})"
        )


@command(
    "eval",
    "perplexity at several budgets or configurations: table, JSON, PNG plot",
    MODEL,
    *load_options(),
    arg("--data", default="builtin", help="builtin (held-out split) | file | dir | .jsonl | saved dataset"),
    arg("--budgets", type=parse_budgets, default=list(REPORTED_BUDGETS), help="comma-separated, in (0, 1]"),
    arg("--arch", help="JSON file: a configuration or a {name: configuration} map (instead of budgets)"),
    arg(
        "--latency-ms",
        type=parse_numbers,
        default=None,
        help="comma-separated latency targets (instead of budgets)",
    ),
    ROUTING,
    LATENCY_SHAPE,
    arg("--seq-len", type=positive_int, default=512),
    arg("--max-blocks", type=positive_int, default=None, help="evaluate at most this many blocks"),
    arg("--batch-size", type=positive_int, default=2),
    arg("--json", default=None, help="write the results here"),
    arg("--plot", default=None, help="write a PNG plot of perplexity vs parameters here"),
)
def evaluate(args: argparse.Namespace) -> None:
    from flextron.data import load_blocks
    from flextron.evaluate import (
        archs_for_budgets,
        evaluate_archs,
        format_table,
        load_arch_file,
        write_results,
    )
    from flextron.outputs import check_output_file

    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    _preflight_arch(args, single=False)
    model = _load(
        args.model, args, _fits_context("--seq-len", args.seq_len), _shape_fits(args), _arch_fits(args)
    )
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: evaluation text cannot be tokenized")
    blocks = load_blocks(model.tokenizer, args.data, args.seq_len, args.max_blocks, split="eval")
    if args.arch:
        rows = evaluate_archs(model, blocks, load_arch_file(args.arch), args.batch_size)
    elif args.latency_ms is None and args.routing == "auto" and not Path(args.model).is_dir():
        rows = evaluate_archs(model, blocks, archs_for_budgets(model, args.budgets), args.batch_size)
    else:
        from flextron.routers import evaluate_selections

        resolver = _resolver(model, args)
        requests = (
            [(None, ms) for ms in args.latency_ms] if args.latency_ms else [(b, None) for b in args.budgets]
        )
        selections = [resolver.select(budget, ms, args.routing) for budget, ms in requests]
        rows = evaluate_selections(model, blocks, selections, args.batch_size)
    print(f"perplexity on {blocks.numel()} tokens ({args.data}):")
    print(format_table(rows))
    write_results(rows, args.json, args.plot)


@command(
    "generate",
    "answer a prompt at a budget, streaming the tokens",
    MODEL,
    *load_options(),
    arg("prompt"),
    arg("--budget", type=budget_float, default=None, help="fraction of the full model (default 1)"),
    arg(
        "--latency-ms",
        type=positive_float,
        default=None,
        help="latency target (needs the model's latency table)",
    ),
    ROUTING,
    LATENCY_SHAPE,
    arg("--arch", help="JSON file with one configuration (instead of --budget)"),
    arg("--max-new-tokens", type=positive_int, default=128),
    arg("--min-new-tokens", type=non_negative_int, default=0, help="no special token (EOS) before this many"),
    arg("--temperature", type=non_negative_float, default=0.0, help="0 = greedy"),
    arg("--top-p", type=budget_float, default=1.0),
    arg("--seed", type=int, default=None),
    arg("--no-chat", action="store_true", help="do not apply the chat template"),
)
def generate(args: argparse.Namespace) -> None:
    from flextron.config import ArchConfig
    from flextron.generate import generate_text

    if args.min_new_tokens > args.max_new_tokens:
        raise ValueError(
            f"--min-new-tokens {args.min_new_tokens} is more than --max-new-tokens {args.max_new_tokens}"
        )
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    _preflight_arch(args, single=True)
    model = _load(args.model, args, _shape_fits(args), _arch_fits(args))
    choice = _choose_arch(model, args)
    arch = choice if isinstance(choice, ArchConfig) else choice.arch
    session = None if isinstance(choice, ArchConfig) else choice.session(1)

    def show(piece: str) -> None:
        print(piece, end="", flush=True)

    start = time.perf_counter()
    generate_text(
        model,
        args.prompt,
        arch,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        chat=not args.no_chat,
        seed=args.seed,
        on_text=show,
        min_new_tokens=args.min_new_tokens,
        session=session,
    )
    print(f"\n[{time.perf_counter() - start:.1f}s]", file=sys.stderr)


@command(
    "export",
    "write one sub-network as a standalone model: Hugging Face, Flextron or GGUF directory",
    MODEL,
    *load_options(),
    arg(
        "--out",
        required=True,
        help="output directory (new or empty; see --overwrite), or FILE.gguf: that one GGUF file",
    ),
    arg("--overwrite", action="store_true", help="replace a non-empty --out directory or an --out file"),
    arg("--budget", type=budget_float, default=None, help="fraction of the full model (default 1)"),
    arg(
        "--latency-ms",
        type=positive_float,
        default=None,
        help="latency target (needs the model's latency table)",
    ),
    arg(
        "--routing",
        choices=("auto", "uniform", "static"),
        default="auto",
        help="static configurations only: auto = the static router when present, else uniform",
    ),
    LATENCY_SHAPE,
    arg("--arch", help="JSON file with one configuration (per-layer allowed) instead of --budget"),
    arg(
        "--format",
        choices=EXPORT_FORMATS,
        default="auto",
        help="auto: Hugging Face (the source family's class) for uniform configurations, else Flextron",
    ),
    arg(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="hf: split the safetensors above this size (e.g. 500MB)",
    ),
    arg(
        "--gguf-type", choices=("f32", "f16", "bf16", "q8_0"), default=None, help="gguf weights (default f16)"
    ),
    arg(
        "--pad-layers",
        action="store_true",
        help="hf: hold a per-layer configuration by zero-padding every layer to the widest "
        "(same outputs; stores the zeros)",
    ),
    arg(
        "--eval-blocks",
        type=non_negative_int,
        default=0,
        help="measure perplexity on this many held-out blocks of 512 tokens for the model card",
    ),
)
def export(args: argparse.Namespace) -> None:
    from flextron.config import ArchConfig
    from flextron.export import check_format_for_path, names_a_gguf_file
    from flextron.export import export as export_model
    from flextron.model_card import ModelCard
    from flextron.outputs import check_new_output_file, check_output_dir, staged_output

    check_format_for_path(args.format, args.out)
    if names_a_gguf_file(args.out) and args.eval_blocks > 0:
        raise ValueError(
            f"--eval-blocks measures perplexity for the model card, which the single file {args.out} "
            "has no place for: export to a directory (an --out without .gguf)"
        )
    check_out = check_new_output_file if names_a_gguf_file(args.out) else check_output_dir
    check_out(args.out, overwrite=args.overwrite, sources=_sources(args.model))
    _preflight_arch(args, single=True)
    model = _load(args.model, args, _shape_fits(args), _arch_fits(args))
    choice = _choose_arch(model, args)
    arch = choice if isinstance(choice, ArchConfig) else choice.arch
    selection = f"configuration file {args.arch}" if isinstance(choice, ArchConfig) else choice.describe()
    card = ModelCard(source=args.model, selection=selection)
    if args.eval_blocks > 0:
        if model.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer: --eval-blocks needs one")
        from flextron.data import load_blocks
        from flextron.evaluate import perplexity

        block = min(512, model.config.max_position_embeddings)
        blocks = load_blocks(model.tokenizer, "builtin", block, args.eval_blocks, split="eval")
        card.perplexity = perplexity(model, blocks, arch)[0]
        card.perplexity_data = f"{blocks.shape[0]} x {blocks.shape[1]} tokens of the built-in held-out text"
    # The weights keep the --dtype they were loaded in (a bfloat16 export is half a float32 one).
    with staged_output(args.out, args.overwrite) as staged:
        used = export_model(
            model,
            arch,
            staged,
            format=args.format,
            max_shard_size=args.max_shard_size,
            gguf_type=args.gguf_type,
            card=card,
            pad_layers=args.pad_layers,
        )
    size = f"{model.num_parameters(arch) / 1e6:.1f}M-parameter"
    padded = " (zero-padded to its widest layer)" if args.pad_layers and not arch.is_uniform else ""
    print(f"exported a {size} sub-network as {used}{padded} to {args.out}")


# ---- latency table and routers


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"shapes must look like 1x128,4x128, got {text!r}") from error
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise argparse.ArgumentTypeError(f"shapes must look like 1x128,4x128 (positive sizes), got {text!r}")
    return shapes


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _flextron_dir(path: str) -> Path:
    from flextron.checkpoint import is_flextron_dir

    if not is_flextron_dir(path):
        raise ValueError(f"{path} is not a Flextron directory: run `flextron convert --out DIR` first")
    return Path(path)


@command(
    "bench",
    "prefill and decode tokens/s at several budgets, optionally against transformers",
    MODEL,
    *load_options(),
    arg("--budgets", type=parse_budgets, default=list(REPORTED_BUDGETS), help="comma-separated, in (0, 1]"),
    arg("--prompt-len", type=positive_int, default=128, help="prompt tokens (batch 1)"),
    arg("--new-tokens", type=positive_int, default=32, help="greedy decode steps after the prompt"),
    arg("--repeats", type=positive_int, default=3),
    arg("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)"),
    arg(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time (one thread: for a shared, busy machine)",
    ),
    arg("--hf", action="store_true", help="also time transformers' LlamaForCausalLM on the same weights"),
    arg("--json", default=None, help="write the results here"),
)
def bench(args: argparse.Namespace) -> None:
    from flextron.atomic_files import write_json_atomic
    from flextron.outputs import check_output_file
    from flextron.speed import format_speed_table, measure_speed, rows_to_json

    check_output_file(args.json, "--json")
    _set_threads(args.threads)
    model = _load(args.model, args, _fits_context("--prompt-len", args.prompt_len, args.new_tokens)).eval()
    rows = measure_speed(
        model, args.budgets, args.prompt_len, args.new_tokens, args.repeats, args.clock, compare_hf=args.hf
    )
    print(f"batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.clock} clock:")
    print(format_speed_table(rows))
    if args.json:
        write_json_atomic(
            Path(args.json),
            {
                "clock": args.clock,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "rows": rows_to_json(rows),
            },
        )


@command(
    "profile",
    "measure the latency lookup table of every MLP width and head count; save it in the model dir",
    arg("--model", required=True, help="a Flextron directory (from convert)"),
    *load_options(),
    arg("--prefill", type=_parse_shapes, default=[(1, 128)], help="BATCHxLENGTH shapes, comma-separated"),
    arg("--decode", type=_parse_shapes, default=[(1, 256)], help="BATCHxCONTEXT shapes, comma-separated"),
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
    from flextron.outputs import check_output_file
    from flextron.routers import LUT_FILE, check_table, profile_latency

    check_output_file(args.json, "--json")
    _set_threads(args.threads)
    directory = _flextron_dir(args.model)
    check_output_file(directory / LUT_FILE, "--model")
    longest = max([length for _, length in args.prefill] + [length + 1 for _, length in args.decode])
    model = _load(args.model, args, _fits_context("--prefill/--decode length", longest))
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
        from flextron.atomic_files import write_json_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.json), {"device": table.device_name, "checks": rows})


def _router_training_options() -> tuple[tuple[tuple[str, ...], dict[str, Any]], ...]:
    """train-router's training options, generated from RouterTrainingConfig."""
    from flextron.cliargs import config_options
    from flextron.routers.config import RouterTrainingConfig

    return config_options(RouterTrainingConfig)


@command(
    "train-router",
    "train a static or dynamic router: surrogate-model loop then joint fine-tuning, or e2e",
    arg("--model", required=True, help="a Flextron directory with a latency table (flextron profile)"),
    *_router_training_options(),
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
)
def train_router(args: argparse.Namespace) -> None:
    from flextron.atomic_files import write_json_atomic
    from flextron.cliargs import config_from_args
    from flextron.outputs import check_output_file
    from flextron.routers import ROUTERS_META_FILE, RouterTrainingConfig, train_routers

    config = config_from_args(RouterTrainingConfig, args, tau_start=args.tau[0], tau_end=args.tau[1])
    check_output_file(args.log, "--log")
    _set_threads(args.threads)
    directory = _flextron_dir(args.model)
    check_output_file(directory / ROUTERS_META_FILE, "--model")
    model = _load(args.model, None, _fits_context("--seq-len", config.seq_len), _shape_fits(args))
    result = train_routers(model, directory, config)
    for message in result.messages:
        print(message)
    if args.log:
        write_json_atomic(Path(args.log), result.logs)


@command(
    "train",
    "elastic continued training with distillation from the frozen original (torchrun-ready)",
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
    import copy

    from flextron.train import NonFiniteLossError, init_distributed
    from flextron.train import train as train_model
    from flextron.train.distributed import shutdown_distributed

    _check_train_run(args)
    config = config_from_args(TrainConfig, args)
    _set_threads(args.threads)
    context = init_distributed(args.device, args.fsdp)
    try:
        model, data = _training_model_and_data(args, context)
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


def _check_train_run(args: argparse.Namespace) -> None:
    """Refuse a locked, occupied or unresumable --out before anything is loaded."""
    from flextron.train.rundir import check_run_dir, check_unlocked
    from flextron.train.train_state import resumed_step
    from flextron.train.trainer import check_resume_steps

    check_unlocked(args.out)
    check_run_dir(args.out, args.resume, args.overwrite)
    if args.resume:  # the checkpoint's step
        step = resumed_step(Path(args.out) / "checkpoints")
        if step is not None:
            check_resume_steps(step, args.steps, args.stop_after)


def _training_model_and_data(args: argparse.Namespace, context) -> tuple[Any, Any]:
    """The model to train (from --model) and its TrainData of --seq-len + 1 token blocks."""
    from flextron.train import load_train_data

    model = _load(args.model, None, _fits_context("--seq-len", args.seq_len, 1))
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: training text cannot be tokenized")
    if not model.importance:
        print(
            f"warning: {args.model} is not converted; sub-networks are unranked prefixes "
            "(run flextron convert first)",
            file=sys.stderr,
        )
    data = load_train_data(model.tokenizer, args.data, args.seq_len + 1, args.val_fraction, args.val_blocks)
    if context.is_main:
        print(
            f"{data.train.shape[0]} training and {data.val.shape[0]} validation blocks of "
            f"{args.seq_len + 1} tokens; {context.world_size} process(es) on {context.device}",
            file=sys.stderr,
        )
    return model, data


@command(
    "demo",
    "the embedded SmolLM2 end to end: convert, perplexity per budget, plot, answers",
    arg("--out", default="runs/demo", help="directory for the converted model, table, JSON and plot"),
    *config_options(DemoConfig),
)
def demo(args: argparse.Namespace) -> None:
    from flextron.demo import run_demo
    from flextron.outputs import check_output_dir

    config = config_from_args(DemoConfig, args)
    check_output_dir(args.out, overwrite=True)  # a cache: reused, never replaced wholesale
    run_demo(Path(args.out), config)


# ---- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="flextron", description="Flextron: many-in-one elastic LLMs")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (function, help, arguments) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help, description=help)
        for names, options in arguments:
            sub.add_argument(*names, **options)
        sub.set_defaults(function=function)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input exits with status 2 and a one-line error."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # a usage error (already printed, one line) or --help
        return exit.code if isinstance(exit.code, int) else 2
    try:
        if isinstance(getattr(args, "model", None), str):
            from flextron.hub import resolve_model_dir

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


if __name__ == "__main__":
    sys.exit(main())
