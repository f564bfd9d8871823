"""edit.py: inpaint / sdedit / invert / edit a real (tiny) checkpoint, and its one-line errors.

Most cases compose conf/edit.yaml with Hydra's compose API and call the task in-process; one runs
the script end to end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT, run_script
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from fewstep.config import register_resolvers
from fewstep.edit import run_task


def compose_edit(tmp_path, *overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("edit", overrides=[f"out_dir={tmp_path}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.runtime.cwd = str(tmp_path)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def ckpt(trained_run) -> str:
    return str(trained_run / "checkpoints" / "last.ckpt")


def test_edit_script_inpaints_and_keeps_known_pixels(ckpt, tmp_path):
    proc = run_script(
        "edit.py", f"ckpt={ckpt}", "task=inpaint", "task.mask=half", "n=3", "sampler.steps=2", f"out_dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"]["name"] == "inpaint" and summary["nfe"] == 2 and summary["n"] == 3
    assert 0 <= summary["rmse"] <= 1 and summary["seconds"] > 0
    arrays = np.load(tmp_path / "edits.npz")
    keep = ~arrays["masks"].transpose(0, 2, 3, 1)
    assert np.array_equal(arrays["results"][keep], arrays["inputs"][keep])  # known pixels exactly the input's
    assert (tmp_path / "edits.png").is_file()


@pytest.mark.parametrize(
    ("overrides", "nfe"),
    [
        (["task=sdedit", "task.strength=0.5", "sampler.steps=4"], 2),
        (["task=invert", "sampler=ddim", "sampler.steps=3"], {"invert": 3, "generate": 3}),
        (["task=inpaint", "task.method=repaint", "task.resample=2", "sampler=ddpm", "sampler.steps=2"], 4),
    ],
)
def test_tasks_report_their_evaluations(ckpt, tmp_path, overrides, nfe):
    summary = run_task(compose_edit(tmp_path, f"ckpt={ckpt}", "n=2", *overrides))
    assert summary.get("nfe_parts", summary["nfe"]) == nfe
    arrays = np.load(tmp_path / "edits.npz")
    assert len(arrays["results"]) == 2 and arrays["results"].shape == arrays["inputs"].shape


def test_folder_input_and_its_errors(ckpt, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with pytest.raises(ValueError, match="has no images"):
        run_task(compose_edit(tmp_path, f"ckpt={ckpt}", f"input={folder}"))
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(folder / "a.png")
    with pytest.raises(ValueError, match=r"a.png is 40x40 but the model takes \d+x\d+: resize=true scales it"):
        run_task(compose_edit(tmp_path, f"ckpt={ckpt}", f"input={folder}"))
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    with pytest.raises(ValueError, match="has 3 channel"):
        run_task(compose_edit(tmp_path, f"ckpt={ckpt}", f"input={folder}"))
    summary = run_task(
        compose_edit(
            tmp_path, f"ckpt={ckpt}", f"input={folder / 'a.png'}", "resize=true", "task=sdedit", "sampler.steps=2"
        )
    )
    assert summary["n"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["task=invert", "sampler=ddpm"],
            "sampler 'ddpm' is stochastic or integrates downwards only and cannot invert",
        ),
        (["task=invert", "sampler=ddim", "sampler.eta=1.0"], "set sampler.eta=0.0"),
        (["task=sdedit", "task.strength=1.5"], r"strength must be in \(0, 1\]"),
        (["task=inpaint", "task.mask=nowhere.png"], "is neither one of center, half, random nor an image file"),
        (["task=inpaint", "task.method=blend"], "unknown inpainting method 'blend'"),
        (["input=missing_dir"], "input=missing_dir is not a file or folder"),
        (["task=edit", "sampler=ddim"], "task=edit changes the condition: it needs a model trained with labels"),
    ],
)
def test_bad_input_one_line_errors(ckpt, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_task(compose_edit(tmp_path, f"ckpt={ckpt}", "n=2", "sampler.steps=2", *overrides))


def test_mask_file_of_another_size(ckpt, tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(path)
    with pytest.raises(ValueError, match="give one of their size or resize=true"):
        run_task(compose_edit(tmp_path, f"ckpt={ckpt}", f"task.mask={path}"))
    big = np.zeros((64, 64), dtype=np.uint8)
    big[32:] = 255
    Image.fromarray(big).save(path)
    summary = run_task(
        compose_edit(tmp_path, f"ckpt={ckpt}", f"task.mask={path}", "resize=true", "n=1", "sampler.steps=2")
    )
    mask = np.load(tmp_path / "edits.npz")["masks"]
    half = mask.shape[-1] // 2  # the bottom half, at the model's size
    assert summary["n"] == 1 and mask[0, 0, half:].all() and not mask[0, 0, :half].any()
