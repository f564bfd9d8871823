"""CPU DDP with 2 processes (gloo): training, checkpoints and sampling callbacks without deadlock."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_NET, run_script

pytestmark = pytest.mark.slow


def test_ddp_two_cpu_processes(tmp_path):
    proc = run_script(
        "train.py",
        *TINY_NET,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "logger=csv",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "callbacks.sample_grid.every_n_steps=3",
        "callbacks.sample_grid.num_samples=4",
        "callbacks.sampling_time.num_samples=4",
        "sampler.steps=3",
        f"hydra.run.dir={tmp_path}",
        timeout=300,  # a deadlock in a callback would hang here, not pass
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in output and "MEMBER: 2/2" in output
    # One file per grid, written by rank 0 only; one checkpoint series; one timing record.
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["final.png", "step_0000003.png", "step_0000006.png"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert json.loads((tmp_path / "sampling_time.json").read_text())["sampling/nfe"] == 3
