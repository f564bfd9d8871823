"""Mid-epoch resume after a real ``kill -9``: the resumed run ends bit-identical to an uninterrupted one.

The runs are real ``train.py`` subprocesses: an uninterrupted run to ``max_steps``; the same run
SIGKILLed once its last checkpoint holds step 20 or later (20 batches into a 562-batch epoch);
and that run resumed from its ``last.ckpt``. The data order (a stateful training loader whose
position Lightning saves in the checkpoint), the RNG states (the noise and timesteps of
``training_step``), weights, EMA, optimiser and LR schedule must all line up for the final
weights to be equal bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_NET
from torch.utils.data import TensorDataset

from fewstep.lit.datamodule import EpochShuffle, ResumableLoader


def toy_loader(num_workers: int = 0) -> ResumableLoader:
    dataset = TensorDataset(torch.arange(42))
    options = {"num_workers": num_workers, "persistent_workers": num_workers > 0}
    return ResumableLoader(dataset, sampler=EpochShuffle(42, seed=3), seed=3, batch_size=4, drop_last=True, **options)


def epoch(loader: ResumableLoader, number: int) -> list[list[int]]:
    loader.sampler.set_epoch(number)
    return [batch[0].tolist() for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_is_the_batches_yielded_and_resume_skips_them(num_workers):
    loader = toy_loader(num_workers)
    assert len(loader) == 10
    order = epoch(loader, 1)
    assert epoch(loader, 1) == order != epoch(loader, 2)  # a function of (seed, epoch) only
    rng = torch.get_rng_state()
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    taken = [next(batches)[0].tolist() for _ in range(3)]  # workers have prefetched more than these
    assert taken == order[:3]
    assert loader.state_dict() == {"epoch": 1, "batches": 3, "length": 10}
    assert torch.equal(rng, torch.get_rng_state()), "iterating the loader drew from torch's global RNG"

    resumed = toy_loader(num_workers)
    resumed.load_state_dict(loader.state_dict())  # before Lightning's set_epoch, as on a resume
    assert resumed.sampler.epoch == 1
    assert [batch[0].tolist() for batch in resumed] == order[3:]  # the rest of the epoch, nothing twice
    assert resumed.state_dict() == {"epoch": 1, "batches": 10, "length": 10}
    assert epoch(resumed, 2) == epoch(toy_loader(num_workers), 2)  # the next epochs are whole

    if num_workers == 0:  # the pass starts at the first draw, after the trainer's set_epoch
        moved_on = toy_loader()  # e.g. saved at the end of an epoch shortened by limit_train_batches
        moved_on.load_state_dict({"epoch": 1, "batches": 3, "length": 10})
        assert epoch(moved_on, 2) == epoch(toy_loader(), 2) and moved_on.state_dict()["batches"] == 10

    at_end = toy_loader(num_workers)
    at_end.load_state_dict({"epoch": 1, "batches": 10, "length": 10})  # saved on the last batch
    assert at_end.sampler.epoch == 2 and [batch[0].tolist() for batch in at_end] == epoch(toy_loader(), 2)


MAX_STEPS = 40
KILL_AFTER = 20  # kill once last.ckpt holds at least this step (checkpoints every 10 steps)


def overrides(run_dir: Path) -> list[str]:
    return [
        *TINY_NET,  # batch 8: 4,500 // 8 = 562 batches an epoch, so every checkpoint here is mid-epoch
        "trainer.accelerator=cpu",
        f"trainer.max_steps={MAX_STEPS}",
        "logger=none",
        "~callbacks.sample_grid",
        "~callbacks.sampling_time",
        "callbacks.model_checkpoint.every_n_train_steps=10",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        'callbacks.model_checkpoint.filename="step-{step:07d}"',
        f"hydra.run.dir={run_dir}",
    ]


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # One thread per run: the two cores are shared, and oversubscribed threads make a step 20x slower.
    # TMPDIR on the checkpoints' file system: Lightning (fsspec) writes a checkpoint to a temp file
    # and renames it into place, which is atomic only within one file system.
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update({"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp"), "HYDRA_FULL_ERROR": "0"})
    env.update({"WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    return env


def saved_step(path: Path) -> int:
    """The global step of a checkpoint (-1 while there is none); renames make a half-written file impossible."""
    if not path.is_file():
        return -1
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def start(run_dir: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    """train.py in the background, its output in ``<run_dir>.log``."""
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *overrides(run_dir), *extra],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def finish(proc: subprocess.Popen, run_dir: Path) -> None:
    try:
        returncode = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == 0, _tail(run_dir)


def kill_after_checkpoint(run_dir: Path, env: dict[str, str]) -> int:
    """Start the run, SIGKILL it once last.ckpt holds step >= KILL_AFTER; the step it holds."""
    proc = start(run_dir, env)
    last, marker = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / f"step-{KILL_AFTER:07d}.ckpt"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, f"the run ended before it was killed:\n{_tail(run_dir)}"
            assert time.monotonic() < deadline, f"no step-{KILL_AFTER} checkpoint in 300 s:\n{_tail(run_dir)}"
            if marker.exists():  # a cheap stat until then
                # Freeze the run while we look (on a busy machine it could otherwise reach MAX_STEPS
                # first); last.ckpt is written right after the step checkpoint.
                proc.send_signal(signal.SIGSTOP)
                if saved_step(last) >= KILL_AFTER:
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # a real kill -9: no teardown, no final checkpoint
        returncode = proc.wait(timeout=60)
        assert returncode == -signal.SIGKILL, f"exit status {returncode}:\n{_tail(run_dir)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return saved_step(last)


def _tail(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")[-3000:]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_exact(tmp_path):
    env = subprocess_env(tmp_path)
    straight, killed, resumed = tmp_path / "straight", tmp_path / "killed", tmp_path / "resumed"

    uninterrupted = start(straight, env)  # alongside the other two: one thread each, two cores
    try:
        step = kill_after_checkpoint(killed, env)
        assert KILL_AFTER <= step < MAX_STEPS
        # Every checkpoint the killed run left is complete (written to a temp file, then renamed).
        for path in (killed / "checkpoints").iterdir():
            assert path.suffix == ".ckpt", f"a stray file next to the checkpoints: {path.name}"
            torch.load(path, map_location="cpu", weights_only=True)
        saved = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        # Mid-epoch, and the training loader's position is in the checkpoint: the batches trained on.
        (loader_state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert loader_state["epoch"] == saved["epoch"] == 0
        assert loader_state["batches"] == step < loader_state["length"]

        finish(start(resumed, env, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"), resumed)
    finally:
        finish(uninterrupted, straight)
    assert not (resumed / "checkpoints" / "step-0000010.ckpt").exists(), "the run started over instead of resuming"

    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("ema.") for k in a["state_dict"]), "no EMA weights to compare"
    diff = {k: (a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item() for k in a["state_dict"]}
    worst = max(diff, key=diff.get)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), (
        f"the resumed run ended {diff[worst]:.3g} away from the uninterrupted one (worst: {worst})"
    )
    # The optimiser moments too: the runs are the same from here on, not only at this step.
    moments = zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True)
    assert all(torch.equal(sa[k], sb[k]) for sa, sb in moments for k in sa)
