"""Conditions through every path: the module, the loss, guidance, sample.py and the callbacks (CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_NET, run_script

from fewstep.diffusion import LinearSchedule, Parameterisation
from fewstep.lit import DiffusionModel
from fewstep.nn.text import WordTokenizer

NET = {"_target_": "fewstep.nn.UNet", "base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [8]}
CAPTIONS = ["a bold seven", "a thin 1", "the digit 3, slanted to the left", ""]


def class_model(**kwargs) -> DiffusionModel:
    return DiffusionModel(image_size=16, channels=1, net=NET, num_timesteps=100, num_classes=10, **kwargs)


def text_model(**kwargs) -> DiffusionModel:
    encoder = {"_target_": "fewstep.nn.text.ScratchTextEncoder", "vocab": WordTokenizer.build(CAPTIONS), "dim": 32}
    return DiffusionModel(image_size=16, channels=1, net=NET, num_timesteps=100, text_encoder=encoder, **kwargs)


def test_labels_reach_the_network_and_the_null_label_is_unconditional():
    torch.manual_seed(0)
    model = class_model().eval()  # no dropout
    with torch.no_grad():  # zero-initialised output layers make every input equal at initialisation
        for p in model.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 1, 16, 16)
    batch = (x, torch.tensor([3, 4]))
    cond = model.condition_from_batch(batch)
    assert torch.equal(cond["y"], torch.tensor([3, 4]))
    dropped = model.condition_from_batch((x.repeat(50, 1, 1, 1), torch.full((100,), 3)), dropout=0.5)["y"]
    assert 20 < int((dropped == 10).sum()) < 80  # about half replaced by the null label
    d = model.denoiser(use_ema=False)
    sigma = torch.full((2,), 2.0)
    assert not torch.allclose(d(x, sigma, y=torch.tensor([3, 3])), d(x, sigma, y=torch.tensor([4, 4])))
    assert torch.equal(d(x, sigma), d(x, sigma, y=model.null_condition()["y"].expand(2)))


def test_text_model_trains_its_encoder_with_ema_and_samples_prompts():
    model = text_model(ema_decay=0.9)
    assert model.trains_text_encoder and model.ema_text is not None
    cond = model.condition_from_batch((torch.zeros(2, 1, 16, 16), torch.zeros(2), ("a bold seven", "a thin 1")))
    assert cond["context"].shape[:2] == cond["context_mask"].shape and cond["pooled"].shape == (2, 32)
    loss = model.parameterisation.loss(model.net, torch.zeros(2, 1, 16, 16), cond)
    loss.backward()
    assert model.text_encoder.token.weight.grad is not None  # the encoder learns with the denoiser
    result = model.sample(
        4, steps=2, seed=0, prompt=["a bold seven"] * 2 + ["a thin 1"] * 2, guidance=3.0, return_result=True
    )
    assert result.images.shape == (4, 1, 16, 16) and result.nfe == 4  # 2 guided steps, 2 evaluations each


def test_condition_errors_are_one_line():
    unconditional = DiffusionModel(image_size=16, channels=1, net=NET, num_timesteps=100)
    with pytest.raises(ValueError, match="without class labels"):
        unconditional.sample(1, steps=1, y=3)
    with pytest.raises(ValueError, match="without text"):
        unconditional.sample(1, steps=1, prompt="a seven")
    with pytest.raises(ValueError, match="guidance=cfg needs a model trained with a condition"):
        unconditional.sample(1, steps=1, guidance={"name": "cfg", "scale": 2.0})
    with pytest.raises(ValueError, match=r"outside the model's 10 classes; use y in 0..9"):
        class_model().sample(1, steps=1, y=10)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        DiffusionModel(image_size=16, channels=1, net=NET, num_classes=1)


def test_min_snr_weighting_per_prediction():
    """Hang et al. 2023: weight min(SNR, gamma) on the x0-MSE, i.e. /SNR for eps and /(SNR + 1) for v."""
    schedule = LinearSchedule()
    abar = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=5.0)
    for prediction, expected in (("x0", clipped), ("eps", clipped / snr), ("v", clipped / (snr + 1))):
        weight = Parameterisation(schedule, prediction, "min_snr", 5.0).loss_weight(abar)
        assert torch.allclose(weight, expected)
    # the weighted eps-MSE is min(SNR, gamma) times the x0-MSE it implies (x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar))
    eps_err = torch.randn(3, dtype=torch.float64)
    x0_err = (1 - abar).sqrt() / abar.sqrt() * eps_err
    assert torch.allclose(clipped / snr * eps_err**2, clipped * x0_err**2)
    # EDM's F: an error e in F is c_out e in x0, c_out^2 = sigma^2 sd^2 / (sigma^2 + sd^2) with sigma^2 = 1 / SNR
    edm = Parameterisation(schedule, "edm", "min_snr", 5.0, sigma_data=0.5).loss_weight(abar)
    assert torch.allclose(edm, clipped * (0.25 / snr) / (1 / snr + 0.25))
    assert Parameterisation(schedule, "eps").loss_weight(abar).eq(1).all()
    with pytest.raises(ValueError, match="loss_weighting"):
        Parameterisation(schedule, "eps", "snr")


# ---------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("class_run")
    proc = run_script(
        "train.py",
        *TINY_NET,
        "experiment=mnist5k_class",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sample_grid.num_samples=20",
        "sampler.steps=2",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "litlogger" not in proc.stdout + proc.stderr and "litmodels" not in proc.stdout + proc.stderr
    return run_dir


@pytest.mark.slow
def test_class_conditional_sampling_cli(class_run, tmp_path):
    from PIL import Image

    grid = Image.open(class_run / "samples" / "final.png")  # one row per class, 2 samples each
    assert grid.size[1] > 4 * grid.size[0]
    ckpt = class_run / "checkpoints" / "last.ckpt"
    args = ["sampler=dpmpp_2m", "sampler.steps=3", "n=2", "guidance=cfg", "guidance.scale=2", f"out_dir={tmp_path}"]
    proc = run_script("sample.py", f"ckpt={ckpt}", "y=[0,7]", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["y"] == [0, 7] and summary["n"] == 4 and summary["nfe"] == 6  # guided: 2 evaluations a step
    assert np.load(tmp_path / "samples.npz")["y"].tolist() == [0, 0, 7, 7]
    proc = run_script("sample.py", f"ckpt={ckpt}", "y=12", *args)
    assert proc.returncode == 1 and "error: y=12 is outside the model's 10 classes" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["y=3"], "was trained without class labels"),
        (["prompt=a bold seven"], "was trained without text"),
        (["guidance=cfg"], "guidance=cfg needs a model trained with a condition"),
        (["sampler.steps=abc"], "sampler.steps must be an integer >= 1, got 'abc'"),
        (["sampler=dpmpp_2m", "+sampler.order=3"], "sampler 'dpmpp_2m' has no option order; its options are:"),
    ],
)
def test_bad_condition_and_sampler_input_cli(trained_run, tmp_path, args, message):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    proc = run_script("sample.py", f"ckpt={ckpt}", "n=2", *args, f"out_dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr[-2000:]


@pytest.mark.slow
def test_bad_text_input_cli(tmp_path):
    proc = run_script("train.py", "text_encoder=clip", "data=mnist5k_captions", f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode == 1 and "text_encoder=clip needs text_encoder.path=DIR" in proc.stderr.splitlines()[-1]
    proc = run_script("train.py", "text_encoder=scratch", f"hydra.run.dir={tmp_path / 'b'}")
    assert proc.returncode == 1 and "needs captioned data" in proc.stderr.splitlines()[-1]
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "a digit"}\n')
    proc = run_script(
        "train.py",
        "data=folder",
        f"data.root={folder}",
        "data.captions=true",
        "text_encoder=scratch",
        f"hydra.run.dir={tmp_path / 'c'}",
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("error: ") and "missing.png" in last, proc.stderr[-2000:]
    proc = run_script("sample.py", "ckpt=/dev/null", f"out_dir={tmp_path / 'd'}")
    assert proc.returncode == 1 and "is not a regular file" in proc.stderr.splitlines()[-1]


def test_top_level_api():
    import fewstep

    assert fewstep.DiffusionModel is DiffusionModel and "ddim" in fewstep.SAMPLERS and callable(fewstep.load_model)


def test_fid_callback_draws_labels_with_the_data_frequencies_and_prompts_from_captions():
    from types import SimpleNamespace

    from fewstep.callbacks import FID

    class Data:
        def class_frequencies(self):
            return torch.tensor([0.0] * 8 + [0.9, 0.1])

        def train_captions(self):
            return ["a bold seven", "a thin 1"]

    trainer = SimpleNamespace(datamodule=Data())
    callback = FID(num_samples=2000, seed=3)
    labels = callback.conditions(trainer, class_model())["y"]
    assert len(labels) == 2000 and set(labels.tolist()) <= {8, 9}
    assert abs(float((labels == 8).double().mean()) - 0.9) < 0.03  # 5 standard errors
    assert torch.equal(labels, callback.conditions(trainer, class_model())["y"])  # the same on every rank
    prompts = callback.conditions(trainer, text_model())["prompt"]
    assert len(prompts) == 2000 and set(prompts) == {"a bold seven", "a thin 1"}
