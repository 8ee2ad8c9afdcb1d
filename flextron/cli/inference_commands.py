"""Commands that run a model: eval (perplexity), generate, export (one sub-network) and bench."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flextron.cli.arguments import (
    LATENCY_SHAPE,
    MODEL,
    ROUTING,
    arg,
    command,
    fits_context,
    load,
    load_options,
    parse_numbers,
    preflight_arch,
    request_fits,
    set_threads,
    sources,
)
from flextron.export.hf import DEFAULT_MAX_SHARD_SIZE
from flextron.export.hf import FORMATS as EXPORT_FORMATS
from flextron.model.config import REPORTED_BUDGETS, ArchConfig
from flextron.options import (
    budget_float,
    non_negative_float,
    non_negative_int,
    parse_budgets,
    positive_float,
    positive_int,
)

LATENCY_MS = arg(
    "--latency-ms", type=positive_float, default=None, help="latency target (needs the model's latency table)"
)
BUDGET = arg("--budget", type=budget_float, default=None, help="fraction of the full model (default 1)")


def _choose(model, args: argparse.Namespace):
    """The configuration from --arch, else the Selection for --budget / --latency-ms (printed)."""
    from flextron.routers.selection import choose_configuration

    choice = choose_configuration(
        model,
        args.model,
        arch_file=args.arch,
        budget=args.budget,
        latency_ms=args.latency_ms,
        routing=args.routing,
        shape=args.latency_shape,
    )
    if not isinstance(choice, ArchConfig):
        print(choice.describe(), file=sys.stderr)
    return choice


@command(
    "eval",
    MODEL,
    *load_options(int8=True),
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
    from flextron.data.blocks import load_blocks
    from flextron.eval.perplexity import archs_for_budgets, evaluate_archs, format_table, write_results
    from flextron.io.outputs import check_output_file
    from flextron.model.requests import load_arch_file

    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    preflight_arch(args, single=False)
    model = load(
        args.model, args, fits_context("--seq-len", args.seq_len), request_fits(args), inference=True
    )
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: evaluation text cannot be tokenized")
    blocks = load_blocks(model.tokenizer, args.data, args.seq_len, args.max_blocks, split="eval")
    if args.arch:
        rows = evaluate_archs(model, blocks, load_arch_file(args.arch), args.batch_size)
    elif args.latency_ms is None and args.routing == "auto" and not Path(args.model).is_dir():
        rows = evaluate_archs(model, blocks, archs_for_budgets(model, args.budgets), args.batch_size)
    else:
        from flextron.routers import BudgetResolver, evaluate_selections

        resolver = BudgetResolver(model, args.model, args.latency_shape)
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
    MODEL,
    *load_options(int8=True),
    arg("prompt"),
    BUDGET,
    LATENCY_MS,
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
    from flextron.eval.generation import generate_text

    if args.min_new_tokens > args.max_new_tokens:
        raise ValueError(
            f"--min-new-tokens {args.min_new_tokens} is more than --max-new-tokens {args.max_new_tokens}"
        )
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    preflight_arch(args, single=True)
    model = load(args.model, args, request_fits(args), inference=True)
    choice = _choose(model, args)
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
    MODEL,
    *load_options(),
    arg(
        "--out",
        required=True,
        help="output directory (new or empty; see --overwrite), or FILE.gguf: that one GGUF file",
    ),
    arg("--overwrite", action="store_true", help="replace a non-empty --out directory or an --out file"),
    BUDGET,
    LATENCY_MS,
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
    from flextron.export.gguf import names_a_gguf_file
    from flextron.export.hf import check_export_request
    from flextron.export.hf import export as export_model
    from flextron.export.model_card import ModelCard, measure_perplexity
    from flextron.io.outputs import check_new_output_file, check_output_dir, staged_output

    check_export_request(args.out, args.format, args.eval_blocks)
    check_out = check_new_output_file if names_a_gguf_file(args.out) else check_output_dir
    check_out(args.out, overwrite=args.overwrite, sources=sources(args.model))
    preflight_arch(args, single=True)
    model = load(args.model, args, request_fits(args))
    choice = _choose(model, args)
    arch = choice if isinstance(choice, ArchConfig) else choice.arch
    selection = f"configuration file {args.arch}" if isinstance(choice, ArchConfig) else choice.describe()
    card = ModelCard(source=args.model, selection=selection)
    if args.eval_blocks > 0:
        measure_perplexity(card, model, arch, args.eval_blocks)
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


@command(
    "bench",
    MODEL,
    *load_options(int8=True),
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
    from flextron.eval.speed import format_speed_table, measure_speed, rows_to_json
    from flextron.io.atomic import write_json_atomic
    from flextron.io.outputs import check_output_file

    check_output_file(args.json, "--json")
    if args.hf and args.dtype == "int8":
        raise ValueError("--hf times transformers on the same float weights: it takes no --dtype int8")
    set_threads(args.threads)
    model = load(
        args.model, args, fits_context("--prompt-len", args.prompt_len, args.new_tokens), inference=True
    ).eval()
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
