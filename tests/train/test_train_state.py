"""Training checkpoints: atomic publication, optimizer round trip, survival of SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flextron.model.checkpoint import load_pretrained
from flextron.train.train_state import (
    flatten_optimizer_state,
    latest_checkpoint,
    load_training_state,
    save_checkpoint,
    unflatten_optimizer_state,
)

REPO = Path(__file__).resolve().parents[2]


def adam_state(model: torch.nn.Module) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 300, (1, 8))).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def test_optimizer_state_round_trips_through_tensors_and_json(tiny_flextron) -> None:
    model = tiny_flextron()
    state = adam_state(model)
    tensors, groups = flatten_optimizer_state(state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    back = unflatten_optimizer_state(tensors, groups)
    assert back["state"].keys() == state["state"].keys()
    for index, values in state["state"].items():
        for name, value in values.items():
            assert torch.equal(back["state"][index][name], value)
    # FSDP2's full state dicts key parameters by name, dots included.
    named = {"state": {"layers.0.mlp.up_proj.weight": {"exp_avg": torch.ones(2)}}, "param_groups": []}
    again = unflatten_optimizer_state(*flatten_optimizer_state(named))
    assert list(again["state"]) == ["layers.0.mlp.up_proj.weight"]


def test_save_publishes_and_keeps_the_newest(tiny_flextron, tmp_path) -> None:
    model = tiny_flextron()
    state = adam_state(model)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, state, {"note": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000002", "step-000003"]
    path = latest_checkpoint(tmp_path)
    trainer_state, optimizer_state, rng = load_training_state(path)
    assert trainer_state["step"] == 3 and trainer_state["note"] == 3
    assert torch.equal(rng["cpu"], torch.get_rng_state())
    loaded = load_pretrained(path)  # the checkpoint is a model directory too
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    assert latest_checkpoint(tmp_path / "nothing-here") is None


# The child saves step 1, then is killed while saving step 2 at the point named by argv[2].
CHILD = textwrap.dedent("""
    import sys, time
    import torch
    import flextron.train.train_state as train_state
    from tests.conftest import make_tiny_flextron as tiny_flextron

    root, point = sys.argv[1], sys.argv[2]
    model = tiny_flextron()
    optimizer = torch.optim.AdamW(model.parameters())
    train_state.save_checkpoint(root, 1, model, optimizer.state_dict(), {})

    def hang(*args, **kwargs):
        print("HANGING", flush=True)
        time.sleep(120)

    if point == "weights":  # half-way through the files: the weights written, the rest not
        original = train_state.save_safetensors_atomic
        def stall(path, *args, **kwargs):
            if path.name == train_state.OPTIMIZER_FILE:
                hang()
            return original(path, *args, **kwargs)
        train_state.save_safetensors_atomic = stall
    else:  # every file written, the directory not yet moved into place
        train_state._publish = hang
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # step 2 differs from step 1
    train_state.save_checkpoint(root, 2, model, optimizer.state_dict(), {})
""")


@pytest.mark.parametrize("point", ["weights", "publish"])
def test_sigkill_while_saving_leaves_the_last_good_checkpoint(tiny_flextron, tmp_path, point: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), point],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        assert child.stdout.readline().strip() == "HANGING"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the interrupted save
    path = latest_checkpoint(tmp_path)
    assert path.name == "step-000001"
    load_training_state(path)
    loaded = load_pretrained(path)
    for name, value in tiny_flextron().state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # The next save cleans up after the killed one.
    save_checkpoint(tmp_path, 3, loaded, torch.optim.AdamW(loaded.parameters()).state_dict(), {})
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert latest_checkpoint(tmp_path).name == "step-000003"
