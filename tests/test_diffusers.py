"""diffusers UNet2DModel folders as fewstep models: schedules, denoiser and DDIM against diffusers' own, sample.py.

Every model is a tiny randomly initialised UNet2DModel saved to a temp dir (no download).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from fewstep.config import register_resolvers
from fewstep.diffusers_compat import find_diffusers_files, load_diffusers
from fewstep.sample import sample
from fewstep.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}


def save_pipeline(root: Path, **scheduler_options) -> Path:
    """A DDPMPipeline save (unet/ + scheduler/) of a tiny random UNet2DModel."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY_UNET)
    scheduler = diffusers.DDPMScheduler(**{"clip_sample": False, **scheduler_options})
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    """One saved pipeline per prediction type (linear betas), by diffusers' prediction_type."""
    root = tmp_path_factory.mktemp("diffusers")
    return {kind: save_pipeline(root / kind, prediction_type=kind) for kind in ("epsilon", "v_prediction", "sample")}


@pytest.mark.parametrize(
    "scheduler_options",
    [
        {"beta_schedule": "linear"},
        {"beta_schedule": "linear", "beta_start": 3e-4, "beta_end": 0.015, "num_train_timesteps": 400},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
    ids=["linear", "linear-custom", "squaredcos_cap_v2"],
)
def test_schedule_matches_the_schedulers_alphas_cumprod(scheduler_options, tmp_path):
    model = load_diffusers(save_pipeline(tmp_path, **scheduler_options))
    expected = diffusers.DDPMScheduler(**scheduler_options).alphas_cumprod.double()
    assert model.schedule.num_timesteps == len(expected)
    torch.testing.assert_close(model.schedule.alphas_cumprod, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_equals_the_schedulers_x0_at_training_timesteps(prediction_type, pipelines):
    folder = pipelines[prediction_type]
    model = load_diffusers(folder)
    denoiser = model.denoiser()
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    x_vp = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (0, 1, 137, 500, 998, 999):
            out = unet(x_vp, t).sample
            assert out.std() > 1e-3  # a random network, but not a trivial one
            expected = scheduler.step(out, t, x_vp).pred_original_sample
            # VP -> VE: x = x_vp / sqrt(abar_t) = x_vp * sqrt(1 + sigma_t^2)
            sigma = model.schedule.train_sigmas[t].float()
            got = denoiser(x_vp * (1 + sigma**2).sqrt(), sigma.expand(2))
            scale = float(expected.abs().max())  # x0 of eps at t = 999 is ~1/sqrt(abar) = 157 times the input
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(("prediction_type", "clip"), [("epsilon", False), ("v_prediction", False), ("epsilon", True)])
def test_ddim_trailing_matches_diffusers_ddim(prediction_type, clip, tmp_path):
    """fewstep's DDIM (eta = 0, trailing spacing) = diffusers' DDIMScheduler loop, step for step.

    The conventions line up as follows. Both use the timesteps round(arange(T, 0, -T/N)) - 1 (trailing,
    N dividing T so that diffusers' prev_t = t - T // N is the next one of the list, and -1 after the
    last, where set_alpha_to_one gives abar = 1: the clean x0, fewstep's final sigma = 0). diffusers starts
    from x_vp ~ N(0, I) at t = T - 1; fewstep from the VE x = x_vp / sqrt(abar_{T-1}) = x_vp sqrt(1 + sigma_max^2)
    (not noise * sigma_max: that start differs by sqrt(1 + 1/sigma_max^2)). A DDIM step is then the same in
    both variables: x_prev_vp / sqrt(abar_prev) = x0 + sigma_prev eps. Clipping: fewstep clamps x0 and takes
    eps = (x - x0) / sigma from the clamped x0, which is diffusers' use_clipped_model_output=True.
    """
    folder = save_pipeline(tmp_path, prediction_type=prediction_type, clip_sample=clip)
    model = load_diffusers(folder)
    assert model.hparams.clip_x0 == (1.0 if clip else None)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(
        folder / "scheduler", timestep_spacing="trailing", set_alpha_to_one=True
    )
    steps = 10
    scheduler.set_timesteps(steps)
    sigmas = model.schedule.sigmas(steps, spacing="trailing")
    expected_t = scheduler.timesteps.double()
    torch.testing.assert_close(model.schedule.sigma_to_t(sigmas[:-1].double()), expected_t, atol=1e-3, rtol=0)

    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    x_vp = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x_vp, t).sample
            x_vp = scheduler.step(out, t, x_vp, eta=0.0, use_clipped_model_output=True).prev_sample
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    got = SAMPLERS["ddim"](model.denoiser(), x, sigmas, eta=0.0)
    assert x_vp.std() > 1e-2
    # float32 rounding only: ~3e-7 of the largest value typically, 1.4e-5 seen once on a fresh clone
    torch.testing.assert_close(got, x_vp, rtol=0, atol=4e-5 * max(1.0, float(x_vp.abs().max())))


def test_model_samples_with_every_kind_of_spacing(pipelines):
    model = load_diffusers(pipelines["v_prediction"])
    for sampler, spacing in (("dpmpp_2m", "karras"), ("heun", "logsnr"), ("ddpm", "trailing")):
        images = model.sample(3, sampler, steps=3, spacing=spacing, seed=0)
        assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    again = model.sample(3, "ddpm", steps=3, spacing="trailing", seed=0)
    torch.testing.assert_close(images, again)


def test_folder_layouts(pipelines, tmp_path):
    pipeline = pipelines["epsilon"]
    unet_dir, scheduler = pipeline / "unet", pipeline / "scheduler" / "scheduler_config.json"
    assert find_diffusers_files(pipeline) == (unet_dir, scheduler)
    assert find_diffusers_files(unet_dir) == (unet_dir, scheduler)  # the UNet's folder: ../scheduler
    assert find_diffusers_files(pipeline, subfolder="unet") == (unet_dir, scheduler)
    flat = tmp_path / "flat"  # the older Hub layout: config.json, weights and scheduler_config.json together
    flat.mkdir()
    for path in (*unet_dir.iterdir(), scheduler):
        (flat / path.name).write_bytes(path.read_bytes())
    assert find_diffusers_files(flat) == (flat, flat / "scheduler_config.json")
    torch.testing.assert_close(
        load_diffusers(flat).sample(2, "ddim", steps=2, seed=0),
        load_diffusers(pipeline).sample(2, "ddim", steps=2, seed=0),
    )


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", "is not a folder"),
        ("no config", "has no config.json"),
        ("no scheduler", "no scheduler config"),
        ("scaled_linear", "supported: linear, squaredcos_cap_v2"),
        ("prediction", "prediction_type='flow'"),
        ("conditional", "not a UNet2DModel"),
        ("class labels", "class-conditional"),
        ("no weights", "cannot load the UNet2DModel weights"),
        ("crafted pickle", "cannot load the UNet2DModel weights"),
    ],
)
def test_bad_folder_one_line_error(change, message, tmp_path):
    folder = tmp_path / "pipe"
    save_pipeline(folder)
    if change == "missing":
        folder = tmp_path / "nope"
    elif change == "no config":
        (folder / "unet" / "config.json").unlink()
    elif change == "no scheduler":
        (folder / "scheduler" / "scheduler_config.json").unlink()
    elif change == "scaled_linear":
        _edit_json(folder / "scheduler" / "scheduler_config.json", beta_schedule="scaled_linear")
    elif change == "prediction":
        _edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="flow")
    elif change == "conditional":
        _edit_json(folder / "unet" / "config.json", _class_name="UNet2DConditionModel")
    elif change == "class labels":
        _edit_json(folder / "unet" / "config.json", num_class_embeds=10)
    else:
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    if change == "crafted pickle":  # a .bin that would run code if unpickled without weights_only
        _Evil.marker = tmp_path / "pwned"
        torch.save({"conv_in.weight": _Evil()}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        load_diffusers(folder)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists(), "loading the weights executed code"


class _Evil:
    marker: Path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Evil.marker}",))


def test_without_diffusers_installed_says_how_to_install(pipelines, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'fewstep\[diffusers\]'"):
        load_diffusers(pipelines["epsilon"])


# ------------------------------------------------------------------------------------------- sample.py
def compose_sample(tmp_path: Path, *overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"out_dir={tmp_path}", "device=cpu", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.runtime.cwd = str(tmp_path)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg


def test_sample_task_with_a_diffusers_folder(pipelines, tmp_path):
    folder = pipelines["epsilon"]
    summary = sample(compose_sample(tmp_path, f"diffusers={folder}", "sampler=dpmpp_2m", "sampler.steps=3", "n=4"))
    assert (summary["diffusers"], summary["sampler"], summary["nfe"], summary["n"]) == (str(folder), "dpmpp_2m", 3, 4)
    assert "ckpt" not in summary
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert (tmp_path / "samples.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ckpt=model.ckpt", "diffusers=FOLDER"], "not both"),
        ([], "nothing to sample: give ckpt=PATH"),
        (["diffusers=FOLDER", "eval=true"], "does not record the data it was trained on"),
        (["diffusers=FOLDER", "y=3"], "was trained without class labels"),
    ],
)
def test_sample_task_one_line_errors(overrides, message, pipelines, tmp_path):
    overrides = [o.replace("FOLDER", str(pipelines["epsilon"])) for o in overrides]
    with pytest.raises(ValueError, match=message) as err:
        sample(compose_sample(tmp_path, "n=2", *overrides))
    assert "\n" not in str(err.value)


def test_sample_task_without_diffusers_installed(pipelines, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ValueError, match=r"pip install 'fewstep\[diffusers\]'"):
        sample(compose_sample(tmp_path, f"diffusers={pipelines['epsilon']}", "n=2"))


@pytest.mark.slow
def test_sample_script_with_a_diffusers_folder(pipelines, tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "sample.py",
        f"diffusers={pipelines['v_prediction']}",
        "sampler=dpmpp_2m",
        "sampler.steps=3",
        "n=4",
        f"out_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["nfe"] == 3 and (out / "samples.png").is_file()
    proc = run_script("sample.py", f"diffusers={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'hydra'}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and "is not a folder" in errors[0], proc.stderr[-2000:]
