"""Flextron's runtime against llama.cpp on the same sub-network, in one run, per weight type.

    python benchmarks/bench_llama_cpp.py            # SmolLM2-135M, budgets 1 and 0.5, 1 and 2 threads
    python benchmarks/bench_llama_cpp.py --threads 1 --clock cpu --json out.json

For each budget the sub-network is exported to GGUF (flextron.export.gguf) in f32, bf16 and q8_0,
and llama.cpp (llama-cpp-python, installed by `make test`) runs it beside Flextron at the matching
dtype (fp32 vs f32, bf16 vs bf16, int8 vs q8_0: the same int8 numbers, flextron.model.quantization),
on the same random prompt, timed round-robin (the project's
timing helpers) so that a neighbour's load hits both alike:
  prefill tokens/s   batch 1 x --prompt-len tokens (best of --repeats after a warm-up)
  decode tokens/s    --new-tokens greedy steps after that prompt, each with its own KV cache
                     (median); llama.cpp keeps its default f16 cache, Flextron its model's dtype
  decode GB/s        the sub-network's weight bytes (LM head included) times decode tokens/s: at
                     batch 1 every step streams them all, so this is the rate that bounds decode
The machine's read bandwidth is measured in the same run (a sum over a 1 GiB tensor, best of 5,
same clock) at each thread count, and each decode GB/s is quoted against it.  Targets (issue 29): decode
>= 1.0x llama.cpp at the same weight type, prefill >= 1.0x llama.cpp bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from flextron.eval.speed import prefilled_decode
from flextron.export.gguf import write_gguf
from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel
from flextron.model.loading import load_model_as
from flextron.model.weight_block import pack_weights_
from flextron.timing import CLOCKS, Staged, check_clock, sample_times_ms

# Flextron dtype -> the GGUF type llama.cpp runs beside it, and the bytes a weight takes
WEIGHT_TYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}
WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
BANDWIDTH_BYTES = 1 << 30  # far above the caches


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--budgets", default="1,0.5")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8", help=f"any of {', '.join(WEIGHT_TYPES)}")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall, or process CPU time (one thread)"
    )
    parser.add_argument("--json", default="benchmarks/results/bench_llama_cpp.json")
    args = parser.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.threads = [int(t) for t in args.threads.split(",")]
    if unknown := set(args.dtypes) - set(WEIGHT_TYPES):
        parser.error(f"--dtypes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(WEIGHT_TYPES)}")
    if args.clock == "cpu" and args.threads != [1]:
        parser.error("--clock cpu needs --threads 1 (process CPU time adds up every thread)")
    return args


def read_bandwidth_gbs(threads: int, clock: str) -> float:
    """The machine's read bandwidth at `threads` threads: best of 5 sums over 1 GiB of fp32,
    timed by the benchmark's clock (process CPU time is not cut by a neighbour's load)."""
    torch.set_num_threads(threads)
    data = torch.ones(BANDWIDTH_BYTES // 4)
    samples = sample_times_ms({"sum": data.sum}, torch.device("cpu"), 5, 1, clock)["sum"]
    return BANDWIDTH_BYTES / (min(samples) / 1e3) / 1e9


def weight_bytes(model: FlextronModel, arch: ArchConfig, dtype: str) -> int:
    """The bytes a decode step streams: every weight of the sub-network (tied embeddings count
    once, as the LM head; the embedding lookup reads one row; int8's row scales are negligible)."""
    return model.num_parameters(arch) * WEIGHT_BYTES[dtype]


def load(source: str, dtype: str) -> FlextronModel:
    """The model in `dtype` (int8 quantized from the fp32 weights), its weights in one huge-page
    block as `flextron bench` runs them."""
    return pack_weights_(load_model_as(source, dtype)).eval()


class LlamaCpp:
    """One GGUF file in llama.cpp: prefill and greedy decode, as Flextron's timings run them."""

    def __init__(self, path: Path, threads: int, context: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=context,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    def prefill(self, prompt: list[int]) -> int:
        """Run the prompt from an empty cache; returns the greedy next token."""
        self.llm.reset()
        self.llm.eval(prompt)
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def prefilled_decode(self, prompt: list[int], new_tokens: int):
        """Run the prompt; returns the call that makes `new_tokens` greedy steps after it."""
        token = self.prefill(prompt)

        def decode() -> None:
            nonlocal token
            for _ in range(new_tokens):
                self.llm.eval([token])
                token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

        return decode

    def close(self) -> None:
        self.llm.close()


def measure_pair(
    model: FlextronModel, llama: LlamaCpp, arch: ArchConfig, prompt: torch.Tensor, args: argparse.Namespace
) -> dict[str, float]:
    """Tokens/s of Flextron and llama.cpp, prefill and decode, timed round-robin."""
    ids = prompt[0].tolist()
    samples = sample_times_ms(
        {
            "flextron_prefill": lambda: model(prompt, arch, last_only=True),
            "llama_prefill": lambda: llama.prefill(ids),
            "flextron_decode": Staged(lambda: prefilled_decode(model, prompt, arch, args.new_tokens)),
            "llama_decode": Staged(lambda: llama.prefilled_decode(ids, args.new_tokens)),
        },
        torch.device("cpu"),
        args.repeats,
        1,
        args.clock,
    )
    rates = {}
    for key, ms in samples.items():
        tokens = args.prompt_len if key.endswith("prefill") else args.new_tokens
        rates[key] = tokens * 1e3 / (min(ms) if key.endswith("prefill") else statistics.median(ms))
    return rates


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    models = {name: load(args.model, name) for name in args.dtypes}
    vocab_size = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab_size, (1, args.prompt_len))  # (1, T)
    context = args.prompt_len + args.new_tokens + 1
    results = {"bandwidth_gbs": {}, "rows": []}
    # Each GGUF is exported from the weights Flextron runs; q8_0 from the fp32 weights the int8
    # model was quantized from (the export writes the same int8 numbers), loaded once.
    sources = dict(models)
    if "int8" in models:
        sources["int8"] = models["float32"] if "float32" in models else load(args.model, "float32")
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        files = {}
        for budget in args.budgets:
            for name, model in models.items():
                files[budget, name] = Path(scratch) / f"budget{budget:g}-{WEIGHT_TYPES[name]}.gguf"
                write_gguf(
                    sources[name], model.arch_for_budget(budget), files[budget, name], WEIGHT_TYPES[name]
                )
        for threads in args.threads:
            results["bandwidth_gbs"][threads] = bandwidth = read_bandwidth_gbs(threads, args.clock)
            print(f"{threads} thread(s): read bandwidth {bandwidth:.1f} GB/s", file=sys.stderr)
            for budget in args.budgets:
                for name, model in models.items():
                    arch = model.arch_for_budget(budget)
                    torch.set_num_threads(threads)
                    llama = LlamaCpp(files[budget, name], threads, context)
                    try:
                        rates = measure_pair(model, llama, arch, prompt, args)
                    finally:
                        llama.close()
                    gigabytes = weight_bytes(model, arch, name) / 1e9
                    row = {
                        "threads": threads,
                        "budget": budget,
                        "dtype": name,
                        "gguf_type": WEIGHT_TYPES[name],
                        **rates,
                        "weight_gb": gigabytes,
                        "flextron_decode_gbs": gigabytes * rates["flextron_decode"],
                        "llama_decode_gbs": gigabytes * rates["llama_decode"],
                    }
                    results["rows"].append(row)
                    print_row(row, bandwidth)
    return results


def print_row(row: dict, bandwidth: float) -> None:
    print(
        f"threads {row['threads']} budget {row['budget']:<4g} {row['dtype']:>8} | prefill tok/s: flextron "
        f"{row['flextron_prefill']:6.0f} llama.cpp {row['llama_prefill']:6.0f} "
        f"({row['flextron_prefill'] / row['llama_prefill']:.2f}x) | decode tok/s: flextron "
        f"{row['flextron_decode']:5.1f} llama.cpp {row['llama_decode']:5.1f} "
        f"({row['flextron_decode'] / row['llama_decode']:.2f}x) | decode GB/s: flextron "
        f"{row['flextron_decode_gbs']:.1f} ({row['flextron_decode_gbs'] / bandwidth:.0%} of the bandwidth), "
        f"llama.cpp {row['llama_decode_gbs']:.1f} ({row['llama_decode_gbs'] / bandwidth:.0%})",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads[0])
    try:
        check_clock(args.clock, torch.device("cpu"))
    except ValueError as error:
        sys.exit(f"bench_llama_cpp: {error}")
    import llama_cpp

    results = {
        "model": args.model,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "clock": args.clock,
        "llama_cpp_python": llama_cpp.__version__,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        **run(args),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
