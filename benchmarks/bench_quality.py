"""Quality on general English held-out text: every budget measured twice, beside two baselines.

    make corpus                                   # data/general: train, validation and test text
    PYTHONPATH=. python benchmarks/bench_quality.py --model runs/recipe/final \
        --converted runs/recipe/converted --baseline-b runs/recipe/baseline-b \
        --json benchmarks/results/bench_quality.json --plot docs/images/quality.png

Text: `--split test` (the default: what results are reported on; legal text, technical manuals
and organisational prose) or `--split validation` (what recipe choices are made on: the fortune
files) of the corpus (flextron/data/corpus.py), each disjoint from the training text (13-gram
decontamination).  `--blocks` x `--seq-len` tokens, an equal share from each genre as far as its text goes;
the Flextron rows are also reported per genre (`per_genre`, with the dense model's perplexity on
the same blocks).  Rows, per budget:

  flextron     the model at the budget, run by flextron
  exported     the same budget through `flextron export --format hf`, run by an implementation
               this project did not write, transformers.AutoModelForCausalLM (a per-layer
               configuration is exported with --pad-layers: zero-padded to its widest layer, the
               same function); the two must agree
  llama_cpp    a per-layer configuration also through `flextron export --format gguf` (f32, its
               own sizes per layer), run by llama.cpp where llama-cpp-python is installed
               (`make test` installs it; the bench says when it is not)
  dense        the original model (the GGUF, through transformers) - the ratios' denominator
  rule / chosen  the converted, untrained model at the fixed rule's configuration and at the
               quality-aware choice (budget_configs.json): the choice must win before training
  baseline_a   naive one-shot prune: the converted model (activation importance) with every head
               and the widest MLP within the budget's parameters, no training
  baseline_b   a separately pruned-and-distilled model per budget (`flextron train --p-full 0
               --budgets B` from the converted model, with an equal share of the Flextron run's
               tokens), at the same configuration; `vs_flextron`: log(its perplexity / Flextron's)
               and the standard error of that over the blocks (paired: the same blocks)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flextron.data.blocks import iter_texts, pack, tokenize
from flextron.data.corpus import genre_files
from flextron.model.checkpoint import load_pretrained
from flextron.model.config import ArchConfig, count_parameters
from flextron.model.elastic_model import FlextronModel
from flextron.model.loading import default_gguf_path
from flextron.model.objectives import next_token_cross_entropy

TARGETS = {1.0: 1.02, 0.75: 1.4, 0.5: 2.3, 0.25: 4.5}  # perplexity vs dense on the test text, HF export


@torch.no_grad()
def block_losses(forward, blocks: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """The mean next-token loss of each block (N,) of `forward(batch) -> logits` over blocks (N, S)."""
    return torch.cat(
        [
            next_token_cross_entropy(forward(batch), batch, reduction="none").view(len(batch), -1).mean(1)
            for batch in blocks.split(batch_size)
        ]
    )


def perplexity(losses: torch.Tensor) -> float:
    """exp of the mean of per-block losses (N,): equal-length blocks weigh alike."""
    return math.exp(losses.mean())


def perplexity_of(forward, blocks: torch.Tensor) -> float:
    """The perplexity of `forward(batch) -> logits` over blocks (N, S)."""
    return perplexity(block_losses(forward, blocks))


def flextron_losses(model: FlextronModel, blocks: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
    return block_losses(lambda batch: model(batch, arch), blocks)


def flextron_ppl(model: FlextronModel, blocks: torch.Tensor, arch: ArchConfig) -> float:
    return perplexity(flextron_losses(model, blocks, arch))


def paired_difference(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """log(their perplexity / ours) (> 0: ours is better) and its standard error over the
    blocks, from the per-block losses (N,) of two models on the same blocks: the paired
    difference cancels what the blocks share (how hard each text is)."""
    difference = theirs.double() - ours.double()  # (N,)
    return {
        "log_ratio": float(difference.mean()),
        "standard_error": float(difference.std() / len(difference) ** 0.5),
    }


def hf_ppl(directory: str | Path, blocks: torch.Tensor, gguf_file: str | None = None) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(directory),
        gguf_file=gguf_file,
        dtype=torch.float32,
        trust_remote_code=False,
        local_files_only=True,
    ).eval()
    return perplexity_of(lambda batch: model(batch).logits, blocks)


def llama_cpp_ppl(path: Path, blocks: torch.Tensor) -> float:
    """Perplexity of a GGUF file run by llama.cpp (llama-cpp-python), fp32 KV cache."""
    return perplexity(llama_cpp_losses(path, blocks))


@torch.no_grad()
def llama_cpp_losses(path: Path, blocks: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of each block (N,) of blocks (N, S) through a GGUF file run by
    llama.cpp (llama-cpp-python), fp32 KV cache."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=blocks.shape[1],
        logits_all=True,
        verbose=False,
        n_threads=torch.get_num_threads(),
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )

    def forward(batch: torch.Tensor) -> torch.Tensor:
        logits = []
        for ids in batch.tolist():
            llm.reset()
            llm.eval(ids)
            logits.append(torch.from_numpy(llm.scores[: len(ids)].copy()))  # (S, V)
        return torch.stack(logits)  # (B, S, V)

    try:
        return block_losses(forward, blocks)
    finally:
        llm.close()


def exported_ppl(
    model_dir: str, budget: float, uniform: bool, blocks: torch.Tensor, llama_cpp: bool
) -> dict[str, float]:
    """The budget through `flextron export`, as a user runs it, and implementations this project
    did not write: {"transformers": the Hugging Face export (a per-layer configuration
    zero-padded, as Hugging Face's Llama has one size for every layer), "llama.cpp": the f32
    GGUF export of a per-layer configuration at its own sizes, when `llama_cpp` (installed)}."""
    with tempfile.TemporaryDirectory() as scratch:
        hf_dir, gguf_dir = Path(scratch) / "hf", Path(scratch) / "gguf"
        export_cli(model_dir, budget, hf_dir, "hf", *([] if uniform else ["--pad-layers"]))
        measured = {"transformers": hf_ppl(hf_dir, blocks)}
        if not uniform and llama_cpp:
            export_cli(model_dir, budget, gguf_dir, "gguf", "--gguf-type", "f32")
            measured["llama.cpp"] = llama_cpp_ppl(next(gguf_dir.glob("*.gguf")), blocks)
        return measured


def export_cli(model_dir: str, budget: float, out: Path, format: str, *extra: str) -> None:
    """`flextron export --format FORMAT`, as a user runs it."""
    command = [
        sys.executable,
        "-m",
        "flextron",
        "export",
        "--model",
        model_dir,
        "--budget",
        f"{budget:g}",
        "--format",
        format,
        *extra,
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip().splitlines()[-1:]}")


def naive_prune_arch(model: FlextronModel, parameters: int) -> ArchConfig:
    """Every head, the widest uniform MLP whose sub-network has at most `parameters`."""
    config = model.config
    widths = [
        w
        for w in config.mlp_choices()
        if count_parameters(config, ArchConfig.uniform(config, w, config.num_heads)) <= parameters
    ]
    return ArchConfig.uniform(config, max(widths or config.mlp_choices()[:1]), config.num_heads)


def split_blocks(tokenizer, corpus: str, split: str, seq_len: int, count: int) -> dict[str, torch.Tensor]:
    """Each genre of a corpus split as (count // genres, seq_len) blocks (fewer if its text is short)."""
    files = genre_files(corpus, split)
    if not files:
        raise SystemExit(f"{corpus}: no {split} text (rebuild it with `make corpus`)")
    share = max(1, count // len(files))
    return {
        genre: pack(
            tokenize(tokenizer, (text for path in paths for text in iter_texts(path))), seq_len, share
        )
        for genre, paths in sorted(files.items())
    }


def by_genre(losses: torch.Tensor, dense_losses: torch.Tensor, genre_of: list[str]) -> dict[str, dict]:
    """Per genre: the perplexity of `losses` (N,), the dense model's, and their ratio."""
    result = {}
    for genre in dict.fromkeys(genre_of):
        mask = torch.tensor([g == genre for g in genre_of])
        ppl, dense = perplexity(losses[mask]), perplexity(dense_losses[mask])
        result[genre] = {"blocks": int(mask.sum()), "perplexity": ppl, "dense": dense, "ratio": ppl / dense}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the trained Flextron directory")
    parser.add_argument(
        "--converted",
        required=True,
        help="the converted, untrained Flextron directory (with budget_configs.json)",
    )
    parser.add_argument(
        "--baseline-b", help="a directory holding one trained run per budget: b0.75/, b0.5/ ..."
    )
    parser.add_argument("--corpus", default="data/general", help="a `flextron corpus` directory")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--budgets", default="1,0.75,0.5,0.25")
    parser.add_argument("--blocks", type=int, default=72)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", default="benchmarks/results/bench_quality.json")
    parser.add_argument("--plot", default="docs/images/quality.png")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {message}", file=sys.stderr, flush=True)

    budgets = [float(b) for b in args.budgets.split(",")]
    model = load_pretrained(args.model)
    converted = load_pretrained(args.converted)
    genres = split_blocks(model.tokenizer, args.corpus, args.split, args.seq_len, args.blocks)
    blocks = torch.cat(list(genres.values()))  # (N, S), genre by genre
    genre_of = [genre for genre, part in genres.items() for _ in range(len(part))]
    log(
        f"{args.split}: {blocks.shape[0]} x {blocks.shape[1]} tokens, "
        + ", ".join(f"{g} {len(b)}" for g, b in genres.items())
    )
    llama_cpp = importlib.util.find_spec("llama_cpp") is not None  # optional: flextron[gguf]
    if not llama_cpp:
        log("llama-cpp-python is not installed: the GGUF exports are not run by llama.cpp")
    gguf = default_gguf_path()
    dense = hf_ppl(gguf.parent, blocks, gguf.name)
    log(f"dense (transformers on {gguf.name}): {dense:.2f}")
    # The converted model at full width is the original function (a permutation): dense per genre.
    dense_losses = flextron_losses(converted, blocks, converted.arch_for_budget(1.0))  # (N,)

    rows = []
    for budget in budgets:
        arch = model.arch_for_budget(budget)
        row: dict = {
            "budget": budget,
            "arch": arch.to_dict(),
            "parameters": model.num_parameters(arch),
        }
        losses = flextron_losses(model, blocks, arch)  # (N,)
        row["flextron"] = perplexity(losses)
        row["per_genre"] = by_genre(losses, dense_losses, genre_of)
        measured = exported_ppl(args.model, budget, arch.is_uniform, blocks, llama_cpp)
        row["exported"] = measured["transformers"]
        if "llama.cpp" in measured:
            row["llama_cpp"] = measured["llama.cpp"]
        row["agreement"] = max(abs(ppl / row["flextron"] - 1) for ppl in measured.values())
        row["ratio"] = row["exported"] / dense
        if budget < 1.0:
            from flextron.model.config import arch_for_budget

            rule = arch_for_budget(converted.config, budget)
            chosen = converted.arch_for_budget(budget)
            row["rule"] = {
                "arch": rule.to_dict(),
                "parameters": converted.num_parameters(rule),
                "perplexity": flextron_ppl(converted, blocks, rule),
            }
            row["chosen"] = {
                "arch": chosen.to_dict(),
                "parameters": converted.num_parameters(chosen),
                "perplexity": row["rule"]["perplexity"]
                if chosen == rule
                else flextron_ppl(converted, blocks, chosen),
            }
            naive = naive_prune_arch(converted, row["parameters"])
            row["baseline_a"] = {
                "arch": naive.to_dict(),
                "parameters": converted.num_parameters(naive),
                "perplexity": flextron_ppl(converted, blocks, naive),
            }
            run = Path(args.baseline_b or "") / f"b{budget:g}" / "checkpoints"
            if args.baseline_b and (run / "latest.json").is_file():
                checkpoint = run / json.loads((run / "latest.json").read_text())["path"]
                trained = load_pretrained(checkpoint)
                baseline_losses = flextron_losses(trained, blocks, arch)  # (N,)
                row["baseline_b"] = {
                    "checkpoint": str(checkpoint),
                    "parameters": trained.num_parameters(arch),
                    "perplexity": perplexity(baseline_losses),
                    "vs_flextron": paired_difference(losses, baseline_losses),
                }
        row["target"] = TARGETS.get(budget)
        rows.append(row)
        log(json.dumps({k: v for k, v in row.items() if k != "arch"}))

    result = {
        "text": {
            "corpus": args.corpus,
            "split": args.split,
            "blocks": {genre: len(part) for genre, part in genres.items()},
            "seq_len": blocks.shape[1],
        },
        "model": args.model,
        "converted": args.converted,
        "dense": dense,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(rows, dense))
    plot(rows, dense, args.plot)
    log(f"wrote {args.json} and {args.plot}")


def format_table(rows: list[dict], dense: float) -> str:
    def cell(row: dict, key: str) -> str:
        return f"{row[key]['perplexity']:.1f}" if key in row else "-"

    def versus(row: dict) -> str:
        """(b)'s perplexity above Flextron's, with one standard error (> 0: Flextron is better)."""
        if "vs_flextron" not in row.get("baseline_b", {}):
            return "-"
        paired = row["baseline_b"]["vs_flextron"]
        return f"{math.expm1(paired['log_ratio']):+.1%} ± {paired['standard_error']:.1%}"

    lines = [
        f"dense (transformers): {dense:.2f}",
        "| budget | params | flextron | HF export (transformers) | GGUF export (llama.cpp) | vs dense "
        "| target | rule (untrained) | chosen (untrained) | baseline a | baseline b | b vs flextron |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        llama_cpp = f"{row['llama_cpp']:.1f}" if "llama_cpp" in row else "-"
        lines.append(
            f"| {row['budget']:g} | {row['parameters'] / 1e6:.1f}M | {row['flextron']:.1f} | "
            f"{row['exported']:.1f} | {llama_cpp} | "
            f"{row['ratio']:.2f}x | {row['target']}x | {cell(row, 'rule')} | {cell(row, 'chosen')} | "
            f"{cell(row, 'baseline_a')} | {cell(row, 'baseline_b')} | {versus(row)} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], dense: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flextron.io.atomic import save_figure_atomic

    figure, axes = plt.subplots(figsize=(7, 4.5))
    millions = [r["parameters"] / 1e6 for r in rows]
    axes.plot(millions, [r["exported"] for r in rows], "o-", label="Flextron (HF export in transformers)")
    axes.plot(millions, [r["flextron"] for r in rows], "x", color="k", label="Flextron (flextron)")
    for key, style, label in (
        ("chosen", "s--", "quality-aware choice, untrained"),
        ("rule", "v:", "fixed rule, untrained"),
        ("baseline_a", "^-.", "(a) one-shot MLP prune"),
        ("baseline_b", "D-", "(b) pruned + distilled per budget"),
    ):
        points = [(r[key]["parameters"] / 1e6, r[key]["perplexity"]) for r in rows if key in r]
        if points:
            axes.plot(*zip(*points, strict=True), style, label=label)
    axes.axhline(dense, color="grey", linewidth=0.8, label=f"dense SmolLM2 ({dense:.1f})")
    axes.set_yscale("log")
    axes.set_xlabel("parameters (M)")
    axes.set_ylabel("perplexity, general-English held-out text")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    save_figure_atomic(figure, path, dpi=120)


if __name__ == "__main__":
    main()
