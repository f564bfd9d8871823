"""Shared fixtures: the repo root, Hydra composition, a small trained checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# A network small enough to train a few steps in seconds on a CPU.
TINY_NET = [
    "model.net.base_channels=8",
    "model.net.channel_mult=[1,2]",
    "model.net.attention_resolutions=[8]",
    "data.image_size=16",
    "data.batch_size=8",
    # fp32 on every machine: precision=auto would time bf16 and may pick it where the CPU has native bf16
    "trainer.precision=32",
]

torch.set_num_threads(min(2, torch.get_num_threads()))


def run_script(script: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run train.py / sample.py in a subprocess with the network switched off for W&B."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full_env.update({"WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One short real training run through train.py (default logger: W&B offline); its run dir."""
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_script(
        "train.py",
        *TINY_NET,
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "callbacks.sample_grid.every_n_steps=3",
        "callbacks.sample_grid.num_samples=4",
        "callbacks.sampling_time.num_samples=4",
        "sampler.steps=3",
        f"hydra.run.dir={run_dir}",
        env={"HOME": str(run_dir)},  # no ~/.netrc: W&B must go offline by itself
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def one_thread():
    """For modules of thousands of tiny tensor ops (exact-solution tests): a second thread only adds
    synchronisation, worst on a busy machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
