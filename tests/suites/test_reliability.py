"""The reliability promises of docs/reliability.md: no foreign code or network, bounded chat
templates, no surprise overwrites, one writer per run directory, durable checkpoints, and
latency tables that say when they cannot be trusted."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from flextron.cli import main
from flextron.io import outputs
from flextron.latency.shape import LatencyShape
from flextron.latency.table import LatencyTable, ShapeCosts
from flextron.model.checkpoint import save_pretrained
from flextron.train.rundir import LOCK_FILE, RunLockedError, check_unlocked, run_lock
from flextron.train.train_state import LATEST, latest_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    "OMP_NUM_THREADS": "1",
}

# transformers runs a copy from its module cache: the marker's path is written into the code.
CUSTOM_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the model directory's code ran")
from transformers import PreTrainedTokenizerFast
class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture(scope="session")
def flextron_dir(tiny_flextron, tiny_tokenizer):
    """A factory fixture (it needs tiny_flextron, tiny_tokenizer)."""

    def flextron_dir(path: Path, chat_template: str | None = None) -> Path:
        model = tiny_flextron()
        model.tokenizer = tiny_tokenizer()
        if chat_template is not None:
            model.tokenizer.chat_template = chat_template
        save_pretrained(model, path)
        return path

    return flextron_dir


def dead_pid() -> int:
    """The PID of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def run_in_terminal(argv: list[str], answer: bytes, env: dict, timeout: float = 120) -> tuple[int, str]:
    """Run argv on a pseudo-terminal, typing `answer` at every "[y/N]" prompt; (status, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, *argv], env)
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
        if b"[y/N]" in chunk:
            os.write(fd, answer)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


# ---- no foreign code, no network


@pytest.mark.parametrize("config_file", ["tokenizer_config.json", "config.json"])
def test_custom_code_is_refused_even_when_the_terminal_says_yes(tiny_hf_dir, tmp_path, config_file) -> None:
    crafted = tmp_path / "crafted"
    tiny_hf_dir(crafted)
    (crafted / "custom_tok.py").write_text(CUSTOM_CODE.format(marker=str(crafted / "CODE-RAN")))
    data = json.loads((crafted / config_file).read_text())
    data["auto_map"] = {
        "AutoTokenizer": ["custom_tok.CustomTokenizer", "custom_tok.CustomTokenizer"],
        "AutoConfig": "custom_tok.CustomConfig",
    }
    if config_file == "tokenizer_config.json":
        data["tokenizer_class"] = "CustomTokenizer"
    (crafted / config_file).write_text(json.dumps(data))
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # where transformers copies run code
    argv = ["-m", "flextron", "generate", "--model", str(crafted), "hi"]
    status, output = run_in_terminal(argv, b"y\n", env)
    assert not (crafted / "CODE-RAN").exists(), output
    assert status == 2, output
    assert "auto_map" in output and "Traceback" not in output
    if config_file == "tokenizer_config.json":
        # Past our refusal, transformers itself refuses (without asking)...
        from transformers import AutoTokenizer

        from flextron.io.local_hf import LOCAL_ONLY

        with pytest.raises(ValueError, match="custom code"):
            AutoTokenizer.from_pretrained(str(crafted), **LOCAL_ONLY)
        assert not (crafted / "CODE-RAN").exists()
        # ... while a plain call, answered `y` on a terminal, would have run it: the attack is real.
        attack = f"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained({str(crafted)!r})"
        run_in_terminal(["-c", attack], b"y\n", env)
        assert (crafted / "CODE-RAN").exists()


def test_a_vanished_directory_is_not_looked_up_on_the_hub(tmp_path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    from flextron.io.local_hf import LOCAL_ONLY, load_local_tokenizer

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    gone = tmp_path / "gone" / "model"
    with pytest.raises(FileNotFoundError, match="not found"):
        load_local_tokenizer(gone)
    # Past our own check (the directory deleted in between), transformers stays local too.
    with pytest.raises(OSError):
        AutoTokenizer.from_pretrained(str(gone), **LOCAL_ONLY)


def test_a_runaway_chat_template_fails_within_seconds(flextron_dir, tmp_path) -> None:
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"
    model = flextron_dir(tmp_path / "model", template)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "flextron", "generate", "--model", str(model), "hi"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "chat template ran for more than 5 s" in result.stderr.splitlines()[-1]
    assert elapsed < 60  # 5 s of template, the rest start-up on a busy machine


def test_an_oversized_chat_template_output_is_refused(tiny_tokenizer) -> None:
    from flextron.eval.generation import chat_prompt_ids
    from flextron.limits import LimitError

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxxxxxx' }}{% endfor %}"
    with pytest.raises(LimitError, match="output is"):
        chat_prompt_ids(tokenizer, "hi")
    assert chat_prompt_ids(tiny_tokenizer(), "hi")  # a normal template is untouched


# ---- nothing overwritten by surprise


def test_staged_output_leaves_nothing_when_the_writer_fails(tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with outputs.staged_output(out) as staged:
            staged.mkdir()
            (staged / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []
    # Overwriting: a failure keeps the old directory; success replaces it whole.
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with outputs.staged_output(out, overwrite=True) as staged:
            staged.mkdir()
            raise RuntimeError("again")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with outputs.staged_output(out, overwrite=True) as staged:
        staged.mkdir()
        (staged / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_output_removes_a_dead_writers_leftovers_only(tmp_path) -> None:
    dead, alive = tmp_path / f".out.tmp-{dead_pid()}-abc", tmp_path / f".out.tmp-{os.getppid()}-abc"
    dead.mkdir()
    alive.mkdir()
    with outputs.staged_output(tmp_path / "out") as staged:
        staged.write_text("done")
    assert not dead.exists() and alive.exists()


def test_convert_and_export_overwrite_only_when_asked(flextron_dir, tmp_path) -> None:
    source = flextron_dir(tmp_path / "model")
    out = tmp_path / "small"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["export", "--model", str(source), "--budget", "0.5", "--out", str(out)]
    assert main(argv) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "small"]  # no stray staging directory


# ---- one writer per run directory


HOLD_LOCK = """
import sys, time
from flextron.train.rundir import run_lock
with run_lock(sys.argv[1]):
    print("HOLDING", flush=True)
    time.sleep(120)
"""


def test_a_second_trainer_is_refused_with_the_holders_pid(flextron_dir, tmp_path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            check_unlocked(run)
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            with run_lock(run):
                pass
        model = flextron_dir(tmp_path / "model")
        argv = ["-m", "flextron", "train", "--model", str(model), "--out", str(run), "--steps", "1"]
        result = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300
        )
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"PID {holder.pid}" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    # The lock goes with its process: a killed holder leaves the directory free.
    check_unlocked(run)
    with run_lock(run), run_lock(run):  # re-entrant within one process
        check_unlocked(run)


def test_train_overwrite_replaces_the_old_run_only(flextron_dir, tmp_path) -> None:
    model = flextron_dir(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000009").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    (run / "notes.txt").write_text("mine")
    argv = [
        "train",
        "--model",
        str(model),
        "--data",
        str(text),
        "--out",
        str(run),
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--val-blocks",
        "1",
        "--eval-budgets",
        "1",
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    assert main([*argv, "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "checkpoints" / "step-000009").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 9 not in steps and latest_checkpoint(run / "checkpoints").name == "step-000001"


# ---- durable checkpoints


def test_checkpoint_files_and_directories_are_flushed_before_publication(
    tiny_flextron, tiny_tokenizer, tmp_path, monkeypatch
) -> None:
    events: list[tuple[str, str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        fsync(fd)

    def recording_replace(source, target) -> None:
        events.append(("replace", str(Path(source).resolve()), str(Path(target).resolve())))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    model = tiny_flextron()
    model.tokenizer = tiny_tokenizer()
    root = tmp_path.resolve()
    save_checkpoint(root, 3, model, torch.optim.AdamW(model.parameters()).state_dict(), {})
    final = root / "step-000003"
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    temp = events[publish][1]
    flushed = {path for kind, path, _ in events[:publish] if kind == "fsync"}
    for file in final.rglob("*"):
        assert str(file).replace(str(final), temp) in flushed, f"{file.name} not flushed before publication"
    assert temp in flushed  # the directory's entries too
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(root / LATEST))
    between = events[publish + 1 : latest]
    assert ("fsync", str(root), "") in between  # the rename itself is durable before latest.json moves
    assert ("fsync", events[latest][1], "") in between  # latest.json's new contents
    assert ("fsync", str(root), "") in events[latest + 1 :]


def test_a_save_removes_its_own_and_dead_writers_temporaries_only(tiny_flextron, tmp_path) -> None:
    model = tiny_flextron()
    state = torch.optim.AdamW(model.parameters()).state_dict()
    save_checkpoint(tmp_path, 1, model, state, {})
    gone, other = dead_pid(), os.getppid()  # a finished process; a live one (pytest's parent)
    strays = {
        tmp_path / f".tmp-{gone}-step-000002-x": True,
        tmp_path / f".latest.json.{gone}-y.tmp": True,
        tmp_path / f".tmp-{os.getpid()}-step-000002-z": True,
        tmp_path / f".latest.json.{other}-w.tmp": False,
        tmp_path / f".tmp-{other}-step-000002-v": False,
    }
    for path in strays:
        if path.name.endswith(".tmp"):
            path.write_text("{}")
        else:
            path.mkdir()
    save_checkpoint(tmp_path, 2, model, state, {})
    for path, removed in strays.items():
        assert path.exists() != removed, path.name
    assert latest_checkpoint(tmp_path).name == "step-000002"


# ---- latency tables that say when they cannot be trusted


def lut(mlp: dict[int, float], heads: dict[int, float]) -> LatencyTable:
    entry = ShapeCosts("prefill", 1, 16, 0.1, mlp, heads)
    return LatencyTable("cpu", "test cpu", "float32", 2, 4, 256, torch.get_num_threads(), "wall", [entry])


def test_a_backwards_table_is_named_and_targets_refused(tiny_flextron, tmp_path) -> None:
    config = tiny_flextron().config
    table = lut({64: 5.0, 128: 4.0, 192: 1.0, 256: 1.0}, {2: 2.0, 4: 1.0})
    with pytest.warns(UserWarning, match="not monotone") as caught:
        table.check_monotone()
    message = str(caught[0].message)
    assert "MLP width 128 (4.000 ms) < 64" in message and "heads 4 (1.000 ms) < 2" in message
    with pytest.raises(ValueError, match="smallest sub-network .* slower than the full model"):
        table.check_target(5.0, config, LatencyShape("prefill", 1, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lut({64: 1.0, 128: 1.02, 256: 1.0}, {2: 1.0, 4: 2.0}).check_monotone()  # within timing noise


def test_a_table_off_by_more_than_ten_percent_says_how_to_reprofile(tmp_path) -> None:
    table = lut({64: 1.0, 256: 2.0}, {2: 1.0, 4: 2.0})
    rows = [{"phase": "prefill", "batch": 1, "length": 16, "error": e} for e in (-0.21, -0.22, 0.05)]
    with pytest.warns(UserWarning, match=r"off by up to 22%.*--repeats.*--threads 1.*idle"):
        table.record_check(rows)
    table.save(tmp_path / "latency.json")
    stored = json.loads((tmp_path / "latency.json").read_text())["checks"]
    assert stored == [{"phase": "prefill", "batch": 1, "length": 16, "errors": [-0.21, -0.22, 0.05]}]
    with pytest.warns(UserWarning, match="off by up to 22%"):
        LatencyTable.load(tmp_path / "latency.json")


def test_the_thread_warning_gives_advice_every_command_can_follow() -> None:
    table = lut({64: 1.0, 256: 2.0}, {2: 1.0, 4: 2.0})
    table.threads = torch.get_num_threads() + 1
    with pytest.warns(UserWarning, match=f"OMP_NUM_THREADS={table.threads}"):
        table.check_device(torch.device("cpu"))
