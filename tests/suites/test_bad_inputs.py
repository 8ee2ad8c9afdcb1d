"""Every user mistake through the real command line: status 2, one stderr line, no traceback,
and the files left exactly as they were.

Each case runs `python -m flextron ...` in a subprocess, in its own copy of a small world
(tiny models, text, broken files).  The subprocesses run concurrently, once per session;
each parametrized test then checks one case's result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A place nobody may write to: a read-only directory, or (root ignores permissions) /proc.
READ_ONLY = "/proc/flextron-read-only" if os.geteuid() == 0 else "{w}/read-only"
WORKERS = 4

ARCH = {"mlp_widths": [128, 128], "heads": [2, 2]}
TRAIN = ["train", "--model", "{w}/conv", "--data", "{w}/text.txt", "--out", "{w}/runs/new", "--seq-len", "16"]
GENERATE = ["generate", "--model", "{w}/conv"]
EVAL = ["eval", "--model", "{w}/conv", "--data", "{w}/text.txt", "--seq-len", "16"]
CONVERT = ["convert", "--model", "{w}/hf", "--calib", "{w}/text.txt", "--seq-len", "16", "--samples", "2"]
EXPORT = ["export", "--model", "{w}/conv"]

# (id, argv, a piece of the expected error line)
CASES = [
    # ---- broken model files
    ("config-missing-field", ["info", "--model", "{w}/cfg-no-hidden"], "'hidden_size'"),
    ("config-rope-string", ["info", "--model", "{w}/cfg-rope-string"], "rope_scaling"),
    ("config-is-a-list", ["info", "--model", "{w}/cfg-list"], "config.json"),
    ("config-is-null", ["info", "--model", "{w}/cfg-null"], "config.json"),
    ("config-eps-string", [*GENERATE[:1], "--model", "{w}/cfg-eps-string", "hi"], "rms_norm_eps"),
    ("config-eps-string-info", ["info", "--model", "{w}/cfg-eps-string"], "rms_norm_eps"),
    ("config-unknown-field", ["info", "--model", "{w}/cfg-unknown"], "unknown fields"),
    ("config-negative-layers", ["info", "--model", "{w}/cfg-negative"], "num_layers"),
    ("config-bias-string", ["info", "--model", "{w}/cfg-bias-string"], "mlp_bias"),
    ("config-bad-version", ["info", "--model", "{w}/cfg-version"], "version"),
    ("weights-corrupt", ["info", "--model", "{w}/corrupt-weights"], "corrupt"),
    ("hf-missing-heads", ["info", "--model", "{w}/hf-no-heads"], "num_attention_heads"),
    ("hf-heads-string", ["info", "--model", "{w}/hf-heads-string"], "num_attention_heads"),
    ("hf-bad-json", ["info", "--model", "{w}/hf-bad-json"], "not valid JSON"),
    ("hf-is-a-list", ["info", "--model", "{w}/hf-list"], "JSON object"),
    ("hf-unsupported", ["info", "--model", "{w}/hf-gpt2"], "unsupported architecture"),
    ("hf-custom-code", ["info", "--model", "{w}/hf-auto-map"], "auto_map"),
    ("hf-pickle-only", ["info", "--model", "{w}/hf-pickle"], "safetensors"),
    ("model-not-found", ["info", "--model", "{w}/nowhere"], "model not found"),
    ("gguf-not-found", ["info", "--model", "{w}/nowhere.gguf"], "GGUF file not found"),
    # ---- numbers checked at parse time
    ("batch-size-zero", [*CONVERT, "--out", "{w}/out", "--batch-size", "0"], "--batch-size"),
    ("temperature-nan", [*GENERATE, "--temperature", "nan", "hi"], "--temperature"),
    ("temperature-negative", [*GENERATE, "--temperature", "-1", "hi"], "--temperature"),
    ("temperature-inf", [*GENERATE, "--temperature", "inf", "hi"], "--temperature"),
    ("max-blocks-negative", [*EVAL, "--max-blocks", "-1"], "--max-blocks"),
    ("max-blocks-zero", [*EVAL, "--max-blocks", "0"], "--max-blocks"),
    ("max-new-tokens-negative", [*GENERATE, "--max-new-tokens", "-5", "hi"], "--max-new-tokens"),
    ("min-new-tokens-negative", [*GENERATE, "--min-new-tokens", "-1", "hi"], "--min-new-tokens"),
    (
        "min-above-max-new-tokens",
        [*GENERATE, "--min-new-tokens", "9", "--max-new-tokens", "3", "hi"],
        "--min-new-tokens 9",
    ),
    ("budgets-empty", [*EVAL, "--budgets", ""], "--budgets"),
    ("budgets-above-one", ["info", "--model", "{w}/conv", "--budgets", "1.5"], "--budgets"),
    ("budgets-zero", ["info", "--model", "{w}/conv", "--budgets", "0,0.5"], "--budgets"),
    ("budgets-text", ["info", "--model", "{w}/conv", "--budgets", "half"], "--budgets"),
    ("budget-zero", [*GENERATE, "--budget", "0", "hi"], "--budget"),
    ("budget-nan", [*GENERATE, "--budget", "nan", "hi"], "--budget"),
    ("top-p-zero", [*GENERATE, "--top-p", "0", "hi"], "--top-p"),
    ("top-p-above-one", [*GENERATE, "--top-p", "1.5", "hi"], "--top-p"),
    ("latency-ms-negative", [*EVAL, "--latency-ms", "-3"], "--latency-ms"),
    ("latency-ms-empty", [*EVAL, "--latency-ms", ""], "--latency-ms"),
    ("latency-shape-zero", [*EVAL, "--latency-shape", "prefill:0x128"], "latency shape"),
    ("latency-shape-nonsense", [*EVAL, "--latency-shape", "fast"], "latency shape"),
    ("seq-len-zero", [*EVAL[:-1], "0"], "--seq-len"),
    ("batch-size-negative", [*EVAL, "--batch-size", "-2"], "--batch-size"),
    ("samples-zero", [*CONVERT, "--out", "{w}/out", "--samples", "0"], "--samples"),
    ("bench-repeats-zero", ["bench", "--model", "{w}/conv", "--repeats", "0"], "--repeats"),
    ("bench-threads-zero", ["bench", "--model", "{w}/conv", "--threads", "0"], "--threads"),
    ("profile-shape-zero", ["profile", "--model", "{w}/conv", "--prefill", "1x0"], "--prefill"),
    ("profile-shape-text", ["profile", "--model", "{w}/conv", "--decode", "big"], "--decode"),
    ("profile-check-negative", ["profile", "--model", "{w}/conv", "--check", "-1"], "--check"),
    ("train-steps-zero", [*TRAIN, "--steps", "0"], "--steps"),
    ("train-stop-after-zero", [*TRAIN, "--stop-after", "0"], "--stop-after"),
    ("train-lr-zero", [*TRAIN, "--lr", "0"], "--lr"),
    ("train-lr-nan", [*TRAIN, "--lr", "nan"], "--lr"),
    ("train-p-full", [*TRAIN, "--p-full", "2"], "--p-full"),
    ("train-budget-weights-negative", [*TRAIN, "--budget-weights", "1,-1,1"], "--budget-weights"),
    ("train-accumulation-zero", [*TRAIN, "--accumulation-steps", "0"], "--accumulation-steps"),
    ("train-val-fraction-one", [*TRAIN, "--val-fraction", "1"], "--val-fraction"),
    ("train-temperature-zero", [*TRAIN, "--temperature", "0"], "--temperature"),
    ("train-rule", [*TRAIN, "--rule", "latency"], "--rule"),
    ("router-steps-zero", ["train-router", "--model", "{w}/conv", "--steps", "0"], "--steps"),
    ("router-tau-zero", ["train-router", "--model", "{w}/conv", "--tau", "0", "1"], "--tau"),
    (
        "router-overhead-text",
        ["train-router", "--model", "{w}/conv", "--calibrate-overhead", "lots"],
        "--calibrate-overhead",
    ),
    (
        "router-trains-in-bf16",
        ["train-router", "--model", "{w}/conv", "--dtype", "bfloat16"],
        "only --mode calibrate",
    ),
    ("demo-samples-zero", ["demo", "--calib-samples", "0"], "--calib-samples"),
    ("routing-choice", [*EVAL, "--routing", "bogus"], "--routing"),
    ("no-command", [], "COMMAND"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("unknown-option", ["info", "--frobnicate"], "--frobnicate"),
    # ---- requests the model cannot serve (checked before anything runs)
    ("seq-len-beyond-context", [*EVAL[:-1], "4096"], "context"),
    ("latency-shape-beyond-context", [*EVAL, "--latency-shape", "prefill:1x4096"], "context"),
    ("convert-seq-len-beyond-context", [*CONVERT[:-4], "--seq-len", "4096", "--out", "{w}/out"], "context"),
    ("train-seq-len-beyond-context", [*TRAIN[:-1], "128"], "context"),
    ("bench-prompt-beyond-context", ["bench", "--model", "{w}/conv", "--prompt-len", "4096"], "context"),
    ("profile-beyond-context", ["profile", "--model", "{w}/conv", "--decode", "1x128"], "context"),
    ("empty-prompt", [*GENERATE, "   "], "prompt is empty"),
    ("profile-not-flextron", ["profile", "--model", "{w}/hf"], "not a Flextron directory"),
    ("router-not-flextron", ["train-router", "--model", "{w}/hf"], "not a Flextron directory"),
    # ---- --arch files
    ("arch-null", [*GENERATE, "--arch", "{w}/arch-null.json", "hi"], "arch-null.json"),
    ("arch-fractional", [*GENERATE, "--arch", "{w}/arch-fraction.json", "hi"], "integers"),
    ("arch-two-for-one", [*GENERATE, "--arch", "{w}/arch-two.json", "hi"], "expected one configuration"),
    ("arch-not-json", [*GENERATE, "--arch", "{w}/arch-bad.json", "hi"], "cannot read"),
    ("arch-missing", [*GENERATE, "--arch", "{w}/arch-missing.json", "hi"], "cannot read"),
    ("arch-too-wide", [*GENERATE, "--arch", "{w}/arch-wide.json", "hi"], "MLP width"),
    ("arch-too-few-layers", [*EXPORT, "--out", "{w}/out", "--arch", "{w}/arch-layers.json"], "layers"),
    ("arch-null-entry", [*EVAL, "--arch", "{w}/arch-null-entry.json"], "ArchConfig"),
    ("arch-a-string", [*EVAL, "--arch", "{w}/arch-string.json"], "arch-string.json"),
    # ---- outputs
    ("out-is-a-file", [*CONVERT, "--out", "{w}/file.txt"], "is a file"),
    ("out-below-a-file", [*CONVERT, "--out", "{w}/file.txt/sub"], "is a file"),
    ("out-read-only", [*CONVERT, "--out", READ_ONLY + "/out"], "cannot write"),
    ("json-read-only", [*EVAL, "--json", READ_ONLY + "/r.json"], "cannot write"),
    ("plot-read-only", [*EVAL, "--plot", READ_ONLY + "/r.png"], "cannot write"),
    ("json-is-a-directory", [*EVAL, "--json", "{w}/conv"], "expected a file name"),
    ("json-below-a-file", [*EVAL, "--json", "{w}/file.txt/r.json"], "is a file"),
    (
        "bench-json-read-only",
        ["bench", "--model", "{w}/conv", "--json", READ_ONLY + "/b.json"],
        "cannot write",
    ),
    (
        "router-log-read-only",
        ["train-router", "--model", "{w}/conv", "--log", READ_ONLY + "/l.json"],
        "cannot write",
    ),
    ("out-empty-name", [*CONVERT, "--out", ""], "must not be empty"),
    ("convert-out-not-empty", [*CONVERT, "--out", "{w}/full"], "not empty"),
    ("export-out-not-empty", [*EXPORT, "--out", "{w}/full"], "not empty"),
    ("export-out-is-source", [*EXPORT, "--out", "{w}/conv"], "source model"),
    ("export-out-is-source-overwrite", [*EXPORT, "--out", "{w}/conv", "--overwrite"], "source model"),
    ("export-out-inside-source", [*EXPORT, "--out", "{w}/conv/small"], "source model"),
    ("convert-out-is-source", [*CONVERT, "--out", "{w}/hf", "--overwrite"], "source model"),
    ("convert-out-holds-source", [*CONVERT, "--out", "{w}", "--overwrite"], "holds the source model"),
    ("export-out-is-a-file", [*EXPORT, "--out", "{w}/file.txt"], "is a file"),
    ("export-gguf-file-exists", [*EXPORT, "--out", "{w}/old.gguf"], "exists"),
    ("export-gguf-file-is-a-dir", [*EXPORT, "--out", "{w}/dir.gguf", "--overwrite"], "is a directory"),
    ("export-gguf-file-as-hf", [*EXPORT, "--out", "{w}/new.gguf", "--format", "hf"], "names a GGUF file"),
    ("export-gguf-file-card", [*EXPORT, "--out", "{w}/new.gguf", "--eval-blocks", "1"], "model card"),
    ("demo-out-is-a-file", ["demo", "--out", "{w}/file.txt"], "is a file"),
    # ---- training runs
    (
        "train-out-holds-a-run",
        [*TRAIN[:-3], "{w}/runs/done", "--seq-len", "16"],
        "already holds a training run",
    ),
    ("train-out-is-a-file", [*TRAIN[:-3], "{w}/file.txt", "--seq-len", "16"], "is a file"),
    ("train-out-below-a-file", [*TRAIN[:-3], "{w}/file.txt/run", "--seq-len", "16"], "is a file"),
    ("train-out-read-only", [*TRAIN[:-3], READ_ONLY + "/run", "--seq-len", "16"], "cannot write"),
    ("train-resume-and-overwrite", [*TRAIN, "--resume", "--overwrite"], "choose one"),
    ("train-latest-not-an-object", [*TRAIN[:-3], "{w}/runs/latest-list", "--resume"], "latest.json"),
    ("train-latest-escapes", [*TRAIN[:-3], "{w}/runs/latest-escape", "--resume"], "latest.json"),
    ("train-latest-dangling", [*TRAIN[:-3], "{w}/runs/latest-dangling", "--resume"], "does not exist"),
    ("train-trainer-no-scheduler", [*TRAIN[:-3], "{w}/runs/no-scheduler", "--resume"], "'scheduler'"),
    (
        "train-steps-below-resumed",
        [*TRAIN[:-3], "{w}/runs/done", "--resume", "--steps", "2"],
        "below the resumed run's step 5",
    ),
    (
        "train-stop-after-done",
        [*TRAIN[:-3], "{w}/runs/done", "--resume", "--stop-after", "5"],
        "already at step 5",
    ),
]


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _build_world(root: Path, tiny_flextron, tiny_hf_dir, tiny_tokenizer) -> None:
    """The files every case starts from (each case gets its own copy)."""
    from flextron.model.checkpoint import save_pretrained

    tiny_hf_dir(root / "hf")
    model = tiny_flextron()
    model.tokenizer = tiny_tokenizer()
    save_pretrained(model, root / "conv")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (root / "file.txt").write_text("a file, not a directory\n")
    (root / "old.gguf").write_bytes(b"GGUF someone's file")
    (root / "dir.gguf").mkdir()
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("someone's work\n")
    if not READ_ONLY.startswith("/proc"):
        (root / "read-only").mkdir(mode=0o555)
    meta = json.loads((root / "conv" / "config.json").read_text())
    flextron_configs = {
        "cfg-no-hidden": lambda m: m["model"].pop("hidden_size"),
        "cfg-rope-string": lambda m: m["model"].update(rope_scaling="linear"),
        "cfg-eps-string": lambda m: m["model"].update(rms_norm_eps="1e-5"),
        "cfg-unknown": lambda m: m["model"].update(hidden_sizes=64),
        "cfg-negative": lambda m: m["model"].update(num_layers=-1),
        "cfg-bias-string": lambda m: m["model"].update(mlp_bias="yes"),
        "cfg-version": lambda m: m.update(version=99),
    }
    for name, edit in flextron_configs.items():
        shutil.copytree(root / "conv", root / name)
        changed = json.loads(json.dumps(meta))
        edit(changed)
        _write_json(root / name / "config.json", changed)
    for name, content in (("cfg-list", "[1, 2]"), ("cfg-null", "null")):
        shutil.copytree(root / "conv", root / name)
        (root / name / "config.json").write_text(content)
    shutil.copytree(root / "conv", root / "corrupt-weights")
    (root / "corrupt-weights" / "model.safetensors").write_bytes(b"\x00" * 64)
    hf = json.loads((root / "hf" / "config.json").read_text())
    hf_configs = {
        "hf-no-heads": lambda c: c.pop("num_attention_heads"),
        "hf-heads-string": lambda c: c.update(num_attention_heads="4"),
        "hf-gpt2": lambda c: c.update(model_type="gpt2"),
        "hf-auto-map": lambda c: c.update(auto_map={"AutoConfig": "custom.Config"}),
    }
    for name, edit in hf_configs.items():
        changed = dict(hf)
        edit(changed)
        _write_json(root / name / "config.json", changed)
    (root / "hf-bad-json").mkdir()
    (root / "hf-bad-json" / "config.json").write_text("{not json")
    _write_json(root / "hf-list" / "config.json", [hf])
    _write_json(root / "hf-pickle" / "config.json", hf)
    (root / "hf-pickle" / "pytorch_model.bin").write_bytes(b"not loaded")
    for name, data in (
        ("arch-null", None),
        ("arch-fraction", {"mlp_widths": [128.5, 128], "heads": [2, 2]}),
        ("arch-two", {"a": ARCH, "b": ARCH}),
        ("arch-wide", {"mlp_widths": [9999, 128], "heads": [2, 2]}),
        ("arch-layers", {"mlp_widths": [128], "heads": [2]}),
        ("arch-null-entry", {"a": None}),
        ("arch-string", "half"),
    ):
        _write_json(root / f"{name}.json", data)
    (root / "arch-bad.json").write_text("{mlp_widths: [")
    # Training runs: a finished one at step 5, and broken ones.
    trainer = {
        "step": 5,
        "scheduler": {},
        "data": {"epoch": 0, "position": 0},
        "config": {},
        "num_train_blocks": 4,
        "optimizer_param_groups": [],
    }
    runs = root / "runs"
    for name, latest, state in (
        ("done", {"step": 5, "path": "step-000005"}, trainer),
        ("latest-list", [], trainer),
        ("latest-escape", {"step": 5, "path": "../../conv"}, trainer),
        ("latest-dangling", {"step": 7, "path": "step-000007"}, trainer),
        (
            "no-scheduler",
            {"step": 5, "path": "step-000005"},
            {k: v for k, v in trainer.items() if k != "scheduler"},
        ),
    ):
        _write_json(runs / name / "checkpoints" / "latest.json", latest)
        _write_json(runs / name / "checkpoints" / "step-000005" / "trainer.json", state)
        (runs / name / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')


def snapshot(root: Path) -> dict[str, tuple | None]:
    """Every path under root; files with their size, modification time and bytes."""
    tree = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        is_file = path.is_file() and not path.is_symlink()
        tree[str(path.relative_to(root))] = (
            (stat.st_size, stat.st_mtime_ns, path.read_bytes()) if is_file else None
        )
    return tree


def _run_case(world: Path, base: Path, case: tuple) -> dict:
    name, argv, _ = case
    work = base / name
    shutil.copytree(world, work, symlinks=True)
    before = snapshot(work)
    command = [sys.executable, "-m", "flextron", *(a.format(w=work) for a in argv)]
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, capture_output=True, text=True, cwd=work, env=env, timeout=300)
    return {"result": result, "before": before, "after": snapshot(work)}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_flextron, tiny_hf_dir, tiny_tokenizer) -> dict[str, dict]:
    """Each case's subprocess result and file trees, all cases run concurrently."""
    world = tmp_path_factory.mktemp("world")
    _build_world(world, tiny_flextron, tiny_hf_dir, tiny_tokenizer)
    base = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(WORKERS) as pool:
        results = pool.map(lambda case: _run_case(world, base, case), CASES)
        return {case[0]: outcome for case, outcome in zip(CASES, results, strict=True)}


def test_at_least_seventy_cases() -> None:
    assert len(CASES) >= 70 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_with_status_2(outcomes, case) -> None:
    name, _, expected = case
    outcome = outcomes[name]
    result = outcome["result"]
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flextron") and "error: " in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert result.stdout == ""
    assert outcome["after"] == outcome["before"], "the command changed files"
