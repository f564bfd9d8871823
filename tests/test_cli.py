"""train.py and sample.py end to end in subprocesses, and their one-line errors on bad input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import TINY_NET, run_script

pytestmark = pytest.mark.slow


def test_train_writes_the_run_dir(trained_run):
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert list((trained_run / "checkpoints").glob("best-*.ckpt"))
    grids = sorted(p.name for p in (trained_run / "samples").glob("step_*.png"))
    assert grids == ["step_0000003.png", "step_0000006.png"] and (trained_run / "samples" / "final.png").is_file()
    timing = json.loads((trained_run / "sampling_time.json").read_text())
    assert timing["sampling/nfe"] == 3 and timing["sampling/images_per_second"] > 0
    assert (timing["sampler"], timing["spacing"]) == ("unipc", "trailing")  # what the default sampler=auto picks at 3
    offline_runs = list((trained_run / "wandb").glob("offline-run-*"))
    assert offline_runs, "the default W&B logger must run offline without an account"
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6 and checkpoint["hyper_parameters"]["data"]["name"] == "mnist5k"


def test_sample_writes_grid_npz_and_summary(trained_run, tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "sample.py",
        f"ckpt={trained_run}/checkpoints/last.ckpt",
        "sampler=ddim",
        "sampler.steps=3",
        "n=10",
        "batch_size=4",
        f"out_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"sampler", "steps", "nfe", "n", "seconds", "images_per_second"} <= set(summary)
    assert (summary["sampler"], summary["steps"], summary["nfe"], summary["n"]) == ("ddim", 3, 3, 10)
    assert summary["batch_size"] == 4
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (10, 16, 16, 1) and images.dtype == np.uint8
    assert (out / "samples.png").stat().st_size > 0


def test_resume_from_last_checkpoint(trained_run, tmp_path):
    proc = run_script(
        "train.py",
        *TINY_NET,
        "logger=csv",
        "trainer.max_steps=8",
        "trainer.val_check_interval=2",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sampling_time.num_samples=2",
        "sampler.steps=2",
        f"ckpt_path={trained_run}/checkpoints/last.ckpt",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Restored all states" in proc.stdout + proc.stderr
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Evil.marker}",))


def _bad_inputs(trained_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _Evil.marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _Evil(), "hyper_parameters": {}}, f)
    last = f"{trained_run}/checkpoints/last.ckpt"
    common = [*TINY_NET, "logger=none", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"]
    return {
        "unknown option": (["train.py", "sampler=fastest"], "choose one of: "),
        "image size": (["train.py", *common, "data.image_size=17"], "is not divisible by 2"),
        "missing ckpt": (["sample.py", f"ckpt={tmp_path}/nope.ckpt"], "does not exist"),
        "other architecture": (
            ["train.py", *common, "model.net.base_channels=16", f"ckpt_path={last}"],
            "another architecture",
        ),
        "empty folder": (["train.py", *common, "data=folder", f"data.root={empty}", "data.image_size=16"], "no images"),
        "nan loss": (
            ["train.py", *common, "module.lr=1e30", "module.warmup_steps=1", "trainer.gradient_clip_val=null"],
            "lower module.lr",
        ),
        "crafted pickle": (["sample.py", f"ckpt={evil}"], "refusing to load"),
        "sampling batch": (["sample.py", f"ckpt={last}", "batch_size=0"], "batch_size must be an integer >= 1 or auto"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown option",
        "image size",
        "missing ckpt",
        "other architecture",
        "empty folder",
        "nan loss",
        "crafted pickle",
        "sampling batch",
    ],
)
def test_bad_input_one_line_error(case, trained_run, tmp_path):
    (script, *args), expected = _bad_inputs(trained_run, tmp_path)[case]
    proc = run_script(script, *args, timeout=180)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "pwned").exists(), "loading a checkpoint executed code"
