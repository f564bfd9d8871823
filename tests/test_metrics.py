"""FID / KID / IS: the arithmetic against references, the feature extractors, the caches, DDP, sweep + report."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_NET, run_script
from omegaconf import OmegaConf

from fewstep.lit import load_model
from fewstep.metrics import GenerativeScores, GivenFeatures, InceptionFeatures, ReferenceStats, reference_stats
from fewstep.metrics import features as features_module
from fewstep.metrics.classifier import SmallCNN, accuracy, classifier_path, held_out, load_or_train
from fewstep.metrics.reference import make_datamodule, reference_key
from fewstep.report import main as report_main
from fewstep.report import report

MNIST16 = {"name": "mnist5k", "root": "data", "image_size": 16, "val_fraction": 0.1, "split_seed": 0}


def gaussian(n: int, dim: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=torch.Generator().manual_seed(123))
    return (torch.randn(n, dim, generator=g) @ mixing) * scale + shift


def scores_for(real: torch.Tensor, **options) -> GenerativeScores:
    extractor = GivenFeatures(real.shape[1])
    return GenerativeScores(extractor, ReferenceStats.from_features(real), **options)


def score(real: torch.Tensor, fake: torch.Tensor, batch: int = 250, **options) -> dict:
    scores = scores_for(real, **options)
    for chunk in fake.split(batch):
        scores.update(chunk)
    return scores.compute()


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook Frechet distance (Heusel et al. 2017) with scipy's matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# ------------------------------------------------------------------------------------ arithmetic
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    real = gaussian(2000, 16, seed=0)
    assert abs(score(real, real, metrics=["fid"])["fid"]) < 1e-3
    fids = [score(real, real + shift, metrics=["fid"])["fid"] for shift in (0.1, 0.5, 1.0)]
    # A pure mean shift by s in every one of d=16 dimensions adds exactly d * s^2.
    assert fids == pytest.approx([16 * 0.01, 16 * 0.25, 16 * 1.0], rel=1e-3, abs=1e-3)


def test_fid_equals_scipy_frechet_distance_on_the_same_features():
    real, fake = gaussian(3000, 24, seed=1), gaussian(1500, 24, seed=2, scale=1.3, shift=0.2)
    expected = scipy_fid(real.double().numpy(), fake.double().numpy())
    assert score(real, fake, batch=97, metrics=["fid"])["fid"] == pytest.approx(expected, rel=1e-4)
    stats = ReferenceStats.from_features(real)
    assert torch.allclose(stats.cov, torch.from_numpy(np.cov(real.double().numpy(), rowvar=False)), atol=1e-8)


def test_kid_is_near_zero_for_the_same_distribution_and_grows_with_a_shift():
    real, same = gaussian(1500, 16, seed=3), gaussian(1500, 16, seed=4)
    options = {"metrics": ["kid"], "kid_subsets": 20, "kid_subset_size": 500}
    near = score(real, same, **options)
    far = score(real, gaussian(1500, 16, seed=4, shift=1.0), **options)
    assert abs(near["kid_mean"]) < 3 * near["kid_std"] + 1e-3
    assert far["kid_mean"] > 50 * max(abs(near["kid_mean"]), near["kid_std"])
    # Seeded subsets: the same numbers every time.
    assert score(real, same, **options)["kid_mean"] == near["kid_mean"]


@pytest.mark.parametrize("k", [2, 5, 10])
def test_inception_score_is_k_for_confident_uniform_predictions_and_1_for_identical_ones(k):
    n = 100 * k
    confident = torch.full((n, 10), -30.0)
    confident[torch.arange(n), torch.arange(n) % k] = 30.0  # 100 images per class, each certain of its class
    real = gaussian(50, 10, seed=0)
    assert score(real, confident, metrics=["is"], is_splits=1)["is_mean"] == pytest.approx(k, rel=1e-4)
    identical = torch.randn(1, 10).expand(n, 10).contiguous()
    result = score(real, identical, metrics=["is"], is_splits=4)
    assert result["is_mean"] == pytest.approx(1.0, abs=1e-5) and result["is_std"] == pytest.approx(0, abs=1e-5)


def test_streaming_in_batches_equals_one_batch_and_reset_keeps_the_reference():
    real, fake = gaussian(800, 8, seed=5), gaussian(600, 8, seed=6, shift=0.3)
    scores = scores_for(real, kid_subset_size=100, kid_subsets=5, is_splits=2)
    scores.update(fake)
    whole = scores.compute()
    scores.reset()
    for chunk in fake.split(7):
        scores.update(chunk)
    streamed = scores.compute()
    assert streamed["n"] == 600 and streamed["reference_n"] == 800
    for key in ("fid", "kid_mean", "is_mean"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-5)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    real, fake = gaussian(203, 8, seed=7), gaussian(203, 8, seed=8, shift=0.2)
    scores = scores_for(real, kid_subset_size=10_000, is_splits=1)  # all in one subset / split: order-free
    share = fake[rank::world]  # unequal shares: 102 and 101
    for chunk in share.split(40 if rank == 0 else 25):  # and unequal numbers of batches
        scores.update(chunk)
    result = scores.compute()
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_sync_over_two_gloo_ranks_equals_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = score(gaussian(203, 8, seed=7), gaussian(203, 8, seed=8, shift=0.2), kid_subset_size=10_000, is_splits=1)
    for rank in (0, 1):
        synced = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert synced["n"] == 203
        for key in ("fid", "kid_mean", "is_mean"):
            assert synced[key] == pytest.approx(single[key], rel=1e-4), (rank, key)


# ------------------------------------------------------------------------------ feature extractors
@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """A cache dir holding the MNIST-5k 16px classifier, trained once with the default options."""
    cache = tmp_path_factory.mktemp("cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is as fast on 2 cores, and immune to oversubscription
    try:
        load_or_train(MNIST16, cache_dir=cache)
    finally:
        torch.set_num_threads(threads)
    return cache


def test_classifier_reaches_high_held_out_accuracy(feature_cache):
    path = classifier_path(MNIST16, feature_cache)
    report_file = json.loads(path.with_suffix(".json").read_text())
    assert report_file["test_split"] == "val" and report_file["test_images"] == 500
    state = torch.load(path, weights_only=True)  # a plain state_dict
    net = SmallCNN.from_state_dict(state, 16)
    test_set, split = held_out(make_datamodule(MNIST16))
    held_out_accuracy = accuracy(net, test_set)
    assert held_out_accuracy > 0.9 and held_out_accuracy == pytest.approx(report_file["test_accuracy"])
    extractor = load_or_train(MNIST16, cache_dir=feature_cache)  # cached: no training
    assert extractor.name == "classifier:mnist5k-16"
    features, logits = extractor(test_set[0][0][None])
    assert features.shape == (1, 128) and logits.shape == (1, 10)
    with pytest.raises(ValueError, match="takes images of shape"):
        extractor(torch.zeros(1, 3, 16, 16))


def test_reference_statistics_cache_hit_and_miss(feature_cache, tmp_path):
    extractor = load_or_train(MNIST16, cache_dir=feature_cache)
    first = reference_stats(MNIST16, extractor, cache_dir=tmp_path, max_kid_features=1000)
    assert not first.from_cache and first.num == 4500 and first.kid_features.shape == (1000, 128)
    again = reference_stats(MNIST16, extractor, cache_dir=tmp_path, max_kid_features=1000)
    assert again.from_cache and torch.equal(again.cov_sum, first.cov_sum) and again.features == extractor.name
    other_split = reference_stats(MNIST16, extractor, split="val", cache_dir=tmp_path, max_kid_features=1000)
    assert not other_split.from_cache and other_split.num == 500
    assert len(list((tmp_path / "reference").glob("*.pt"))) == 2
    for changed in ({"image_size": 32}, {"name": "fashion_mnist"}, {"split_seed": 1}):
        assert reference_key({**MNIST16, **changed}, "train", extractor) != reference_key(MNIST16, "train", extractor)
    with pytest.raises(ValueError, match="has no test split"):
        reference_stats(MNIST16, extractor, split="test", cache_dir=tmp_path)


def _random_inception_weights(path: Path, monkeypatch) -> Path:
    """torch-fidelity's network with its random initial weights, saved as a state_dict (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with monkeypatch.context() as patch:
        patch.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_from_a_local_weights_path(tmp_path, monkeypatch):
    weights = _random_inception_weights(tmp_path / "inception.pth", monkeypatch)
    extractor = InceptionFeatures(weights)
    # Not the standard weights: the name says so (standard: "inception-v3-2048").
    assert extractor.name == f"inception-v3-2048@{extractor.fingerprint}" and extractor.num_features == 2048
    gray = torch.rand(2, 1, 16, 16) * 2 - 1
    features, logits = extractor(gray)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008) and torch.isfinite(features).all()
    rgb_features, _ = extractor(gray.expand(-1, 3, -1, -1))
    assert torch.equal(features, rgb_features)  # gray images are scored as RGB with equal channels


def test_inception_without_weights_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match=r"features\.weights_path=") as err:
        InceptionFeatures()
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"features\.weights_path=.*does not exist"):
        InceptionFeatures(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"check features\.weights_path"):
        InceptionFeatures(tmp_path / "junk.pth")
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the expected weights file"):
        InceptionFeatures(tmp_path / "other.pth")
    assert features_module.resolve_features("auto", 1) == "classifier"
    assert features_module.resolve_features("auto", 3) == "inception"


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_fid_callback_under_cpu_ddp_logs_one_value(feature_cache, tmp_path):
    proc = run_script(
        "train.py",
        *TINY_NET,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "logger=csv",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sampling_time.num_samples=2",
        "sampler.steps=2",
        "callbacks.fid.every_n_steps=4",
        "callbacks.fid.num_samples=11",
        "callbacks.fid.batch_size=4",
        "callbacks.fid.kid=true",
        f"paths.cache_dir={feature_cache}",
        f"hydra.run.dir={tmp_path}",
        timeout=240,  # a deadlock fails here instead of hanging the suite
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        fids = [row["eval/fid"] for row in csv.DictReader(handle) if row.get("eval/fid")]
    assert len(fids) == 1 and float(fids[0]) > 0
    (record,) = [json.loads(line) for line in (tmp_path / "fid.jsonl").read_text().splitlines()]
    assert record["n"] == 11 and record["nfe"] == 2 and record["features"] == "classifier:mnist5k-16"
    assert record["fid"] == pytest.approx(float(fids[0]))


@pytest.mark.slow
def test_sweep_with_eval_and_report(trained_run, feature_cache, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    proc = run_script(
        "sample.py",
        "-m",
        f"ckpt={ckpt}",
        "sampler=ddim,dpmpp_2m",
        "sampler.steps=2,4",
        "n=12",
        "batch_size=5",
        "eval=true",
        f"paths.cache_dir={feature_cache}",
        f"paths.log_dir={tmp_path / 'logs'}",  # the default sweep dir, under it
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "sample" / "multiruns").iterdir()
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 4
    first = json.loads(summaries[0].read_text())
    assert first["features"] == "classifier:mnist5k-16" and first["reference"]["n"] == 4500
    assert all(np.isfinite(first[k]) for k in ("fid", "kid_mean", "is_mean")) and first["n"] == 12
    # Streaming in batches of 5 draws the same samples as one call of the model would.
    job = OmegaConf.load(summaries[0].parent / ".hydra" / "config.yaml")
    model = load_model(ckpt)
    expected = model.sample(12, OmegaConf.to_container(job.sampler), seed=0)
    saved = np.load(summaries[0].parent / "samples.npz")["images"]
    assert np.array_equal(saved, ((expected + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())

    result = report(sweep, tmp_path / "report")
    assert [(r["sampler"], r["nfe"]) for r in result["rows"]] == [
        ("ddim", 2),
        ("ddim", 4),
        ("dpmpp_2m", 2),
        ("dpmpp_2m", 4),
    ]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| FID | KID | IS |" in markdown and "classifier:mnist5k-16" in markdown
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").read_text().splitlines()))
    assert len(rows) == 4 and float(rows[0]["fid"]) == pytest.approx(result["rows"][0]["fid"])
    assert (tmp_path / "report" / "report.png").stat().st_size > 10_000


def test_report_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        report(tmp_path)
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "summary.json").write_text(json.dumps({"sampler": "ddim", "steps": 2, "nfe": 2}))
    with pytest.raises(ValueError, match="eval=true"):
        report(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path / "nothing")])
    stderr = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and stderr.startswith("error: sweep directory") and "\n" not in stderr
