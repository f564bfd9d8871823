"""Distillation through train.py / sample.py: progressive rounds, a consistency student, resuming, errors.

The teacher is the session's tiny trained run; students run a handful of steps (what is checked is
the machinery: rounds, checkpoints, the recorded sampler, resuming; the learning itself is tested on
an exact Gaussian mixture in test_distill.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script
from hydra.utils import instantiate

from fewstep.lit import load_model
from fewstep.train import build_model

# fp32 on every machine, as conftest's TINY_NET (precision=auto may pick bf16 where the CPU has it natively)
DATA = [
    "data.image_size=16",
    "data.batch_size=8",
    "logger=none",
    "callbacks.sample_grid.num_samples=4",
    "trainer.precision=32",
]
PROGRESSIVE = [
    "experiment=distill_progressive",
    "module.distillation.teacher_steps=4",
    "module.distillation.rounds=2",
    "module.distillation.steps_per_round=2",
]


@pytest.fixture(scope="module")
def teacher(trained_run) -> str:
    return str(trained_run / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def progressive_run(teacher, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("progressive")
    proc = run_script("train.py", *PROGRESSIVE, *DATA, f"teacher={teacher}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_progressive_rounds_keep_each_student_with_its_steps(progressive_run, teacher):
    first = load_model(progressive_run / "checkpoints" / "round-0000002.ckpt")
    second = load_model(progressive_run / "checkpoints" / "round-0000004.ckpt")
    assert first.hparams.sampler["steps"] == 2 and second.hparams.sampler["steps"] == 1
    assert second.hparams.distillation["method"] == "progressive"
    assert second.hparams.distillation["teacher"] == teacher
    pairs = zip(first.net.state_dict().values(), second.net.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)  # round 2 trained on


def test_sample_uses_the_students_steps_and_resume_is_exact(progressive_run, tmp_path):
    ckpt = progressive_run / "checkpoints" / "round-0000004.ckpt"
    proc = run_script("sample.py", f"ckpt={ckpt}", "n=2", f"out_dir={tmp_path / 'samples'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "samples" / "summary.json").read_text())
    assert (summary["sampler"], summary["steps"], summary["nfe"]) == ("ddim", 1, 1)
    # resume from the end of round 1: round 2 (with round 1's student as its teacher) comes out the same
    resumed = tmp_path / "resumed"
    proc = run_script(
        "train.py",
        *PROGRESSIVE,
        *DATA,
        f"teacher={load_model(ckpt).hparams.distillation['teacher']}",
        f"ckpt_path={progressive_run / 'checkpoints' / 'round-0000002.ckpt'}",
        f"hydra.run.dir={resumed}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = load_model(resumed / "checkpoints" / "round-0000004.ckpt")
    for key, value in load_model(ckpt).state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, msg=key)


def test_consistency_student_samples_in_one_step_and_errors(teacher, tmp_path):
    run_dir = tmp_path / "consistency"
    proc = run_script(
        "train.py",
        "experiment=distill_consistency",
        *DATA,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.sample_grid.every_n_steps=2",
        f"teacher={teacher}",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    student = run_dir / "checkpoints" / "last.ckpt"
    proc = run_script("sample.py", f"ckpt={student}", "n=2", f"out_dir={tmp_path / 's'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert (summary["sampler"], summary["nfe"]) == ("consistency", 1)
    # a consistency sampler on a plain diffusion checkpoint: one line, no run
    proc = run_script("sample.py", f"ckpt={teacher}", "sampler=consistency", "n=2", f"out_dir={tmp_path / 'x'}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: sampler=consistency needs a consistency-distilled")
    # a diffusion sampler on the student: it runs, with a warning
    proc = run_script(
        "sample.py", f"ckpt={student}", "sampler=ddim", "sampler.steps=2", "n=2", f"out_dir={tmp_path / 'y'}"
    )
    assert proc.returncode == 0 and "was not trained for sampler=ddim" in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experiment=distill_progressive"], "progressive distillation needs a teacher: teacher=PATH"),
        (["experiment=distill_consistency", "teacher=missing.ckpt"], "checkpoint missing.ckpt does not exist"),
        (["experiment=distill_consistency", "TEACHER", "data.image_size=32"], "was trained on 1x16x16 images"),
        (["experiment=distill_consistency", "TEACHER", "module.num_classes=10"], "a student has its teacher's"),
        ([*PROGRESSIVE[:2], "module.distillation.rounds=3", "TEACHER"], "halves the teacher's 4 steps below 1"),
    ],
)
def test_bad_distillation_input(teacher, tmp_path, overrides, message):
    """Composed as train.py would (Hydra compose) and built: one-line errors before any training."""
    from test_config import compose_train, resolve_hydra

    args = [f"teacher={teacher}" if o == "TEACHER" else o for o in overrides]
    cfg = resolve_hydra(compose_train("data.image_size=16", "logger=none", *args), tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        build_model(cfg, instantiate(cfg.data))
    assert message in str(err.value) and "\n" not in str(err.value)
