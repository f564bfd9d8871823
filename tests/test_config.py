"""Every option of every config group composes and instantiates (Hydra's compose API)."""

from __future__ import annotations

import lightning as L
import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from fewstep.config import check_choices, group_options, register_resolvers, wandb_offline
from fewstep.diffusion.sampling import SamplerSpec
from fewstep.lit import ImageDataModule
from fewstep.train import build_model, instantiate_all

CONF = ROOT / "conf"
GROUPS = [
    "data",
    "model",
    "schedule",
    "sampler",
    "guidance",
    "text_encoder",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
]
CASES = [(group, option) for group in GROUPS for option in group_options(group)]


def compose_train(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def resolve_hydra(cfg, tmp_path):
    """Fill in what a real Hydra run provides (runtime dirs) so interpolations resolve."""
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.runtime.cwd = str(tmp_path)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group != "data" or option == "folder":
        overrides.append("data.root=" + str(tmp_path))
    if group == "text_encoder":
        overrides.append("data=mnist5k_captions")
    cfg = resolve_hydra(compose_train(*overrides), tmp_path)
    if (group, option) == ("text_encoder", "clip"):  # needs a saved CLIP folder: the error says so
        with pytest.raises(ValueError, match="text_encoder.path"):
            build_model(cfg, instantiate(cfg.data))
        return
    if group == "data" or cfg.get("text_encoder"):
        datamodule = instantiate(cfg.data)
        assert isinstance(datamodule, ImageDataModule)
        assert group != "data" or datamodule.name == option.removesuffix("_captions")
        datamodule.image_size = 16  # keep the network small: this test is about composition
    else:
        datamodule = ImageDataModule(image_size=16)
    if option.startswith("distill_"):  # students need teacher=PATH (trained with one in test_distill_cli.py)
        with pytest.raises(ValueError, match="needs a teacher: teacher=PATH"):
            build_model(cfg, datamodule)
        return
    if group == "model":
        model = build_model(cfg, ImageDataModule(image_size=32))
    else:
        with open_dict(cfg):
            cfg.model.net.base_channels, cfg.model.net.channel_mult, cfg.model.net.attention_resolutions = 8, [1, 2], []
        model = build_model(cfg, datamodule)
    assert model.hparams.sampler["name"] == cfg.sampler.name
    SamplerSpec.from_config(model.hparams.sampler).sigmas(model.schedule)
    with open_dict(cfg.trainer):
        cfg.trainer.accelerator = "cpu"  # the group's own choice may ask for a GPU this machine lacks
        if cfg.trainer.precision == "auto":  # fewstep.train resolves it before the Trainer (test_precision.py)
            cfg.trainer.precision = "32"
    trainer = instantiate(cfg.trainer, callbacks=instantiate_all(cfg.callbacks), logger=instantiate_all(cfg.logger))
    assert isinstance(trainer, L.Trainer)


def test_defaults_are_the_embedded_cpu_setup(tmp_path):
    cfg = resolve_hydra(compose_train(), tmp_path)
    assert cfg.data.name == "mnist5k" and cfg.schedule.schedule == "linear" and cfg.trainer.max_steps == 4000
    assert cfg.model.net.base_channels == 16 and list(cfg.model.net.channel_mult) == [1, 2, 4, 4]  # tiny_fast
    assert cfg.sampler.name == "auto" and "wandb" in cfg.logger and cfg.trainer.precision == "auto"


def test_seed_schedule_override(tmp_path):
    cfg = resolve_hydra(compose_train("schedule.beta_end=0.01"), tmp_path)
    model = build_model(cfg, ImageDataModule(image_size=16))
    assert model.schedule.betas[-1].item() == pytest.approx(0.01)


def test_unknown_option_lists_valid_ones():
    message = check_choices(["sampler=fast", "trainer.max_steps=3"])
    assert message is not None and "\n" not in message
    assert "sampler 'fast'" in message and "ddim" in message and "ddpm" in message
    assert check_choices(["sampler=ddim,ddpm", "model=tiny"]) is None
    assert "model 'huge'" in check_choices(["model=tiny,huge"])


def test_wandb_offline_unless_configured(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert wandb_offline() is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_offline() is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline() is True
