"""trainer.precision=auto: the rule, the per-machine cache, the warning for emulated bf16, the config default."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

import fewstep.precision as precision
import fewstep.train
from fewstep.config import register_resolvers
from fewstep.lit import DiffusionModel, ImageDataModule
from fewstep.precision import cache_path, native_bf16, probe_speedup, resolve_precision
from fewstep.train import build_model, resolve_trainer_precision

TINY = {"_target_": "fewstep.nn.UNet", "base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": []}


class Probe:
    """A probe that returns a fixed fp32 / bf16 time ratio and counts its calls."""

    def __init__(self, speedup: float) -> None:
        self.speedup, self.calls = speedup, 0

    def __call__(self, dtype: torch.dtype) -> float:
        self.calls += 1
        return self.speedup


@pytest.fixture
def device(monkeypatch):
    """Pretend to be a CPU or a CUDA machine: ``device("cuda")``."""

    def pretend(kind: str) -> None:
        monkeypatch.setattr(precision, "device_kind", lambda accelerator: kind)
        monkeypatch.setattr(precision, "device_name", lambda kind: f"test {kind}")

    return pretend


@pytest.mark.parametrize(
    ("kind", "support", "speedup", "expected", "probed"),
    [
        ("cuda", "native", 0.5, "bf16-mixed", False),  # compute capability >= 8.0: no probe
        ("cuda", "emulated", 1.3, "bf16-mixed", True),
        ("cuda", "emulated", 0.8, "32", True),
        ("cuda", "none", 2.0, "32", False),
        ("cpu", "native", 1.5, "bf16-mixed", True),
        ("cpu", "native", 1.05, "32", True),  # faster, but less than the 10% margin
        ("cpu", "native", 0.7, "32", True),
        ("cpu", "none", 2.0, "32", False),  # no native bf16: fp32 without measuring
        ("other", None, 2.0, "32", False),
    ],
)
def test_auto_rule(kind, support, speedup, expected, probed, device, tmp_path):
    device(kind)
    probe = Probe(speedup)
    assert resolve_precision("auto", "auto", probe, tmp_path, support=support) == expected
    assert probe.calls == int(probed)


def test_explicit_precisions_pass_through(device, tmp_path):
    device("cpu")
    probe = Probe(2.0)
    assert resolve_precision(32, "cpu", probe, tmp_path) == "32"
    assert resolve_precision("bf16-mixed", "cpu", probe, tmp_path, support="native") == "bf16-mixed"
    assert probe.calls == 0


def test_probe_runs_once_per_machine_and_network(device, tmp_path, caplog):
    device("cpu")
    probe = Probe(1.5)
    with caplog.at_level(logging.INFO, logger="fewstep.precision"):
        for _ in range(2):
            assert (
                resolve_precision("auto", "cpu", probe, tmp_path, network={"net": 1}, support="native") == "bf16-mixed"
            )
    assert probe.calls == 1
    verdicts = [r.getMessage() for r in caplog.records if "precision=auto" in r.getMessage()]
    assert len(verdicts) == 2 and all("1.50x" in m for m in verdicts) and "cached in" in verdicts[1]
    resolve_precision("auto", "cpu", probe, tmp_path, network={"net": 2}, support="native")  # another network
    assert probe.calls == 2
    entries = json.loads((tmp_path / "precision.json").read_text())["entries"]
    assert sorted(e["network"]["net"] for e in entries.values()) == [1, 2]
    assert all(e["device"] == "cpu:test cpu" and e["torch"] == torch.__version__ for e in entries.values())


def test_corrupted_cache_is_ignored_and_rewritten(device, tmp_path, caplog):
    device("cpu")
    (tmp_path / "precision.json").write_text('{"version": 1, "entries": {"abc": ')
    probe = Probe(0.5)
    with caplog.at_level(logging.WARNING, logger="fewstep.precision"):
        assert resolve_precision("auto", "cpu", probe, tmp_path, support="native") == "32"
    assert probe.calls == 1
    assert any("corrupted precision cache" in r.getMessage() for r in caplog.records)
    data = json.loads((tmp_path / "precision.json").read_text())
    assert [e["speedup"] for e in data["entries"].values()] == [0.5]
    assert not [p for p in tmp_path.iterdir() if p.name != "precision.json"], "a temporary file was left behind"


def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEWSTEP_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache_path() == tmp_path / "elsewhere" / "precision.json"
    assert cache_path(tmp_path) == tmp_path / "precision.json"


@pytest.mark.parametrize("requested", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_explicit_16_bit_on_a_cpu_without_it_warns_once_and_is_honoured(requested, device, tmp_path, caplog):
    device("cpu")
    probe = Probe(0.4)
    with caplog.at_level(logging.WARNING, logger="fewstep.precision"):
        for _ in range(2):  # the second run reuses the measurement
            assert resolve_precision(requested, "cpu", probe, tmp_path, support="none") == requested
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert probe.calls == 1 and len(warnings) == 2  # one per run
    assert "2.50x slower than fp32" in warnings[0] and f"trainer.precision={requested}" in warnings[0]
    assert "\n" not in warnings[0]


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512f\n")
    assert native_bf16(cpuinfo) is False
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert native_bf16(cpuinfo) is True
    cpuinfo.write_text("flags\t\t: amx_bf16 amx_tile\n")
    assert native_bf16(cpuinfo) is True
    assert native_bf16(tmp_path / "missing") is False  # not Linux: assume no


def test_probe_leaves_the_model_and_the_random_streams_alone():
    model = DiffusionModel(image_size=8, channels=1, net=TINY, num_timesteps=100)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    speedup = probe_speedup(model, torch.bfloat16, batch_size=2, repeats=1)
    assert speedup > 0
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in model.parameters())


def test_train_config_defaults_to_auto_and_resolves_before_the_trainer(monkeypatch, tmp_path):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"data.root={tmp_path}", "model.net.base_channels=8", "model.net.channel_mult=[1,2]"]
        )
    assert cfg.trainer.precision == "auto"
    with open_dict(cfg.trainer):
        cfg.trainer.accelerator, cfg.trainer.default_root_dir = "cpu", str(tmp_path)
    model = build_model(cfg, ImageDataModule(image_size=16))
    monkeypatch.setattr(fewstep.train, "probe_speedup", lambda *args, **kwargs: 2.0)
    for native, expected in ((False, "32"), (True, "bf16-mixed")):
        monkeypatch.setattr(precision, "native_bf16", lambda native=native: native)
        cfg.trainer.precision = "auto"
        assert resolve_trainer_precision(cfg, model, cache_dir=str(tmp_path)) == expected
        assert cfg.trainer.precision == expected
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert isinstance(trainer, L.Trainer)
