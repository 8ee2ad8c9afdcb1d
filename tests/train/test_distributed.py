"""torchrun data parallelism: a 2-process gloo run (DDP or FSDP2) equals a 1-process run with the
same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flextron.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]

# Run as a plain script (one process) or under torchrun (RANK/WORLD_SIZE set); argv: OUT [fsdp].
WORKER = textwrap.dedent("""
    import copy, sys
    import torch
    from flextron.train import TrainConfig, TrainData, init_distributed, train
    from flextron.train.distributed import shutdown_distributed
    from tests.conftest import make_tiny_flextron as tiny_flextron

    torch.set_num_threads(1)
    context = init_distributed("cpu", fsdp=sys.argv[2:] == ["fsdp"])
    ids = torch.randint(0, 300, (20, 13), generator=torch.Generator().manual_seed(0))
    student = tiny_flextron()
    teacher = copy.deepcopy(student)
    config = TrainConfig(steps=3, batch_size=4, accumulation_steps=2, lr=1e-3, warmup_steps=1, eval_every=0,
                         save_every=0, rule="mixed", alpha=0.5)
    data = TrainData(ids[:16], ids[16:])
    train(student, teacher, data, config, sys.argv[1], context=context, progress=False)
    shutdown_distributed()
""")


def run(command: list[str]) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> tuple[Path, Path]:
    """(the worker script, the output of its one-process run)."""
    root = tmp_path_factory.mktemp("single")
    script = root / "worker.py"
    script.write_text(WORKER)
    run([sys.executable, str(script), str(root / "out")])
    return script, root / "out"


# FSDP2 is the heavier variant (four processes in all with the single run): marked slow.
@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_gloo_ranks_equal_one_process(tiny_flextron, single_run, tmp_path, mode: str) -> None:
    script, single_out = single_run
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(tmp_path),
            *(["fsdp"] if mode == "fsdp" else []),
        ]
    )
    single = load_file(single_out / "checkpoints" / "step-000003" / "model.safetensors")
    parallel = load_file(tmp_path / "checkpoints" / "step-000003" / "model.safetensors")
    assert single.keys() == parallel.keys()
    for name in single:
        # Float noise from the different reduction order, amplified where Adam divides a
        # tiny gradient by its tiny running scale; updates themselves are ~1e-3 here.
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-4, atol=1e-4)
    initial = tiny_flextron().state_dict()
    assert not torch.equal(single["layers.0.mlp.up_proj.weight"], initial["layers.0.mlp.up_proj.weight"])
    losses = [
        [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        for out in (single_out, tmp_path)
    ]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
    # Rank 0 alone writes: one metrics log, one checkpoint directory (and it alone held the run's lock).
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [".lock", "checkpoints", "metrics.jsonl", "metrics.png"]
