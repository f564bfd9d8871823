"""DiffusionModel: the seed API, learning, EMA, determinism, checkpoints and resuming."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from fewstep.lit import DiffusionModel, load_model
from fewstep.lit.datamodule import EpochShuffle
from fewstep.lit.module import check_architecture

TINY = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8], "dropout": 0.0}


def small_model(**kwargs) -> DiffusionModel:
    options = {"image_size": 16, "channels": 1, "unet": TINY, "warmup_steps": 1, "lr": 2e-3, "num_timesteps": 100}
    return DiffusionModel(**{**options, **kwargs})


def toy_loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1
    dataset = TensorDataset(images, torch.zeros(n, dtype=torch.long))
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(n, seed=0))


def quiet_trainer(root, max_steps: int, callbacks: list, **options) -> L.Trainer:
    """A CPU Trainer without logger, progress bar, summary or sanity validation."""
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=root,
        num_sanity_val_steps=0,
        **options,
    )


def fit(model: DiffusionModel, root, max_steps: int, ckpt_path=None, every: int = 4) -> L.Trainer:
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=every)
    trainer = quiet_trainer(root, max_steps, [checkpoint])
    trainer.fit(model, train_dataloaders=toy_loader(), ckpt_path=ckpt_path, weights_only=True)
    return trainer


def test_seed_api():
    model = DiffusionModel(image_size=64, beta_start=1e-4, beta_end=0.01, num_timesteps=1000)
    samples = model.sample(2, steps=2)
    assert samples.shape == (2, 3, 64, 64)
    assert samples.min() >= -1 and samples.max() <= 1
    assert model.hparams.beta_end == 0.01


@pytest.mark.parametrize(
    ("prediction", "noise_levels"), [("eps", "uniform"), ("x0", "uniform"), ("v", "uniform"), ("edm", "log_normal")]
)
def test_optimizer_steps_lower_the_loss(prediction, noise_levels):
    torch.manual_seed(0)
    model = small_model(prediction=prediction, noise_levels=noise_levels)
    x0 = next(iter(toy_loader(8, 8)))[0]
    optimizer = torch.optim.Adam(model.net.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:  # same t and noise every time: a fixed objective
        return model.parameterisation.loss(model.net, x0, generator=torch.Generator().manual_seed(1))

    before = loss().item()
    for _ in range(25):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.7 * before


def test_ddim_eta0_is_deterministic():
    model = small_model()
    a = model.sample(3, "ddim", steps=4, generator=torch.Generator().manual_seed(5), eta=0.0)
    b = model.sample(3, "ddim", steps=4, generator=torch.Generator().manual_seed(5), eta=0.0)
    assert torch.equal(a, b)
    # eta = 0 draws noise only for the start: the same start gives the same images, whatever else.
    c = model.sample(3, "ddim", steps=4, generator=torch.Generator().manual_seed(6), eta=0.0)
    assert not torch.equal(a, c)


def test_ema_tracks_weights_with_warmup():
    model = small_model(ema_decay=0.9)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(1.0)
    model.ema.update_parameters(model.net)  # first update copies the weights
    for p, q in zip(model.net.parameters(), model.ema.module.parameters(), strict=True):
        assert torch.equal(p, q)
    old = [q.clone() for q in model.ema.module.parameters()]
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(1.0)
    model.ema.update_parameters(model.net)  # n=1: decay min(0.9, 2/11)
    d = 2 / 11
    for q, o, p in zip(model.ema.module.parameters(), old, model.net.parameters(), strict=True):
        assert torch.allclose(q, d * o + (1 - d) * p, atol=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_ema_averages_over_its_relative_length(sigma_rel):
    """module.ema_sigma_rel (EDM2's power-function EMA): fed the weights t/N and (t/N)**2 at steps
    t = 1..N, the average gives the first two moments of its weighting over the run, whose standard
    deviation is sigma_rel (EDM2, Eq. 4); the weighting is (1 - beta_t) (t/N)**(gamma+1) exactly."""
    from fewstep.lit.module import power_ema_gamma

    n = 2000
    net = torch.nn.Linear(2, 1, bias=False).double()
    ema = DiffusionModel(image_size=8, channels=1, unet=TINY, ema_sigma_rel=sigma_rel).ema
    ema.module = torch.nn.Linear(2, 1, bias=False).double()  # the same averaging on a two-number "network"
    for t in range(1, n + 1):
        with torch.no_grad():
            net.weight.copy_(torch.tensor([[t / n, (t / n) ** 2]], dtype=torch.float64))
        ema.update_parameters(net)
    mean, second = ema.module.weight[0].tolist()
    assert (second - mean**2) ** 0.5 == pytest.approx(sigma_rel, rel=0.01)
    gamma = power_ema_gamma(sigma_rel)
    t = torch.arange(1, n + 1, dtype=torch.float64)
    weights = (1 - ((t - 1) / t) ** (gamma + 1)) * (t / n) ** (gamma + 1)
    assert mean == pytest.approx(float((weights * t / n).sum()), rel=1e-9)


def test_bad_ema_sigma_rel_is_one_line():
    with pytest.raises(ValueError, match=r"module.ema_sigma_rel must be in \(0, 0.289\)"):
        small_model(ema_sigma_rel=0.5)


def test_checkpoint_round_trip_same_samples(tmp_path):
    model = small_model()
    fit(model, tmp_path, max_steps=4)
    loaded = load_model(tmp_path / "ckpt" / "last.ckpt")
    a = model.sample(3, steps=3, generator=torch.Generator().manual_seed(0))
    b = loaded.sample(3, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert loaded.hparams == model.hparams


@pytest.mark.parametrize("lr_decay", ["constant", "cosine"])
def test_resume_continues_from_same_step_and_ema(tmp_path, lr_decay):
    """An interrupted run resumed from last.ckpt ends exactly where an uninterrupted one does (the
    learning-rate schedule included: a decay resumes at the step it was interrupted at)."""
    # the "interrupted" run stops at max_steps=4: lr_decay_steps gives all three runs the 8-step decay
    options = {"lr_decay": lr_decay, "lr_decay_steps": 8}
    L.seed_everything(0)
    straight = small_model(**options)
    fit(straight, tmp_path / "straight", max_steps=8)

    L.seed_everything(0)
    first = small_model(**options)
    fit(first, tmp_path / "split", max_steps=4)  # "interrupted" after 4 steps
    saved = torch.load(tmp_path / "split" / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4

    resumed = small_model(**options)
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["ema"] = [p.clone() for p in pl_module.ema.module.parameters()]

    trainer = quiet_trainer(tmp_path, 8, [Probe()], enable_checkpointing=False)
    trainer.fit(
        resumed, train_dataloaders=toy_loader(), ckpt_path=tmp_path / "split" / "ckpt" / "last.ckpt", weights_only=True
    )
    assert seen["step"] == 4
    ema_saved = [v for k, v in saved["state_dict"].items() if k.startswith("ema.module.")]
    assert all(torch.equal(a, b) for a, b in zip(seen["ema"], ema_saved, strict=True))
    assert trainer.global_step == 8
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), "resumed run diverged from the uninterrupted one"


@pytest.mark.parametrize("lr_decay", ["constant", "cosine", "linear"])
def test_learning_rate_warms_up_then_decays_to_zero_at_the_last_step(tmp_path, lr_decay):
    """module.lr_decay: the rate each optimizer step used, read from the optimizer, follows the warm-up and
    then the decay over the trainer's max_steps."""
    import math

    seen: list[float] = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = small_model(lr=1e-3, warmup_steps=2, lr_decay=lr_decay)
    trainer = quiet_trainer(tmp_path, 10, [Probe()], enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=toy_loader(n=40))
    progress = [(step - 2) / 8 for step in range(2, 10)]
    after_warmup = {
        "constant": [1.0] * 8,
        "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in progress],
        "linear": [1 - p for p in progress],
    }[lr_decay]
    assert seen == pytest.approx([1e-3 * f for f in [0.5, 1.0, *after_warmup]])  # zero at step 10, after the last


def test_bad_lr_decay_is_one_line():
    with pytest.raises(ValueError, match="module.lr_decay must be one of constant, cosine, linear"):
        small_model(lr_decay="step")
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        small_model(lr_decay="cosine").configure_optimizers()  # no trainer: run length unknown
    assert small_model(lr_decay="cosine", lr_decay_steps=100).configure_optimizers()["optimizer"] is not None


def test_architecture_mismatch_is_one_line():
    a, b = small_model(), small_model(unet={**TINY, "base_channels": 16})
    with pytest.raises(ValueError, match="trained with another architecture") as err:
        check_architecture(dict(a.hparams), dict(b.hparams), path="x.ckpt")
    assert "\n" not in str(err.value) and "base_channels" in str(err.value)
    # edm's outputs depend on sigma_data; other predictions ignore it
    edm, edm_other = small_model(prediction="edm"), small_model(prediction="edm", sigma_data=0.6)
    with pytest.raises(ValueError, match="sigma_data=0.5"):
        check_architecture(dict(edm.hparams), dict(edm_other.hparams))
    check_architecture(dict(a.hparams), dict(small_model(sigma_data=0.6).hparams))


def test_nan_loss_stops_with_clear_message():
    model = small_model()
    with torch.no_grad():
        next(model.net.parameters()).fill_(float("nan"))
    batch = next(iter(toy_loader()))
    with pytest.raises(FloatingPointError, match="lower module.lr"):
        model.training_step(batch, 0)


def test_nan_check_every_n_steps_still_stops_before_a_checkpoint(tmp_path):
    """Checked every 100 steps, a loss that blows up at step 1 still stops the run at the step-2 checkpoint,
    before the file is written."""
    model = small_model(lr=1e30, nan_check_every=100)
    with pytest.raises(FloatingPointError, match=r"at step [12]: lower module.lr"):
        fit(model, tmp_path, max_steps=6, every=2)
    assert not list((tmp_path / "ckpt").glob("*.ckpt")), "a checkpoint of non-finite weights was written"
    with pytest.raises(ValueError, match="nan_check_every must be an integer >= 1"):
        small_model(nan_check_every=0)


def test_training_step_reads_nothing_on_the_host_between_checks(monkeypatch):
    """Between two checks a training step and its EMA update never read a tensor on the host (on a GPU
    each read is a sync that stalls the CPU); at a check step, one read."""
    model = small_model(nan_check_every=10)
    batch = next(iter(toy_loader()))
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = {"now": 3}
    monkeypatch.setattr(DiffusionModel, "global_step", property(lambda self: step["now"]))
    monkeypatch.setattr(DiffusionModel, "log", lambda self, *args, **kwargs: None)
    for _ in range(2):
        model.training_step(batch, 0)
        model.ema.update_parameters(model.net)
    assert reads == []
    step["now"] = 10
    model.training_step(batch, 0)
    assert reads == ["tolist"]


def test_ema_counts_on_the_host_and_resumes_its_count():
    """The EMA matches torch's AveragedModel with the same warm-up, and a loaded one continues its count."""
    from torch.optim.swa_utils import AveragedModel

    from fewstep.lit.module import EMA, ema_with_warmup

    net = small_model().net
    ours, reference = EMA(net, 0.9), AveragedModel(net, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(net)
        reference.update_parameters(net)
    assert all(
        torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    loaded = EMA(net, 0.9)
    loaded.load_state_dict(ours.state_dict())
    for ema in (ours, loaded, reference):
        ema.update_parameters(net)
    assert int(loaded.n_averaged) == 4
    pairs = zip(loaded.state_dict().values(), reference.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_optimized_spacing_cached_per_checkpoint(tmp_path):
    model = small_model()
    fit(model, tmp_path, max_steps=4)
    loaded = load_model(tmp_path / "ckpt" / "last.ckpt")
    calls = []
    net_forward = loaded.ema.module.forward
    loaded.ema.module.forward = lambda *a, **k: calls.append(1) or net_forward(*a, **k)
    g = torch.Generator().manual_seed(0)
    first = loaded.sample(2, "dpmpp_2m", steps=3, spacing="optimized", generator=g)
    searched = len(calls)
    assert searched > 100 and first.shape == (2, 1, 16, 16)  # the fine-step reference alone is 511 calls
    cache = tmp_path / "ckpt" / "last.optimized_sigmas.json"
    # the search's cost is stored with the grid: every call of the search ran on its 16 noises
    (record,) = json.loads(cache.read_text())
    assert record["cost"]["network_evaluations"] == 16 * (searched - 3) and record["cost"]["seconds"] > 0
    again = load_model(tmp_path / "ckpt" / "last.ckpt")  # a new process would start like this
    calls.clear()
    net_forward = again.ema.module.forward
    again.ema.module.forward = lambda *a, **k: calls.append(1) or net_forward(*a, **k)
    second = again.sample(2, "dpmpp_2m", steps=3, spacing="optimized", generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3 and torch.equal(first, second)  # only the sampler's own 3 calls


def test_ld3_spacing_cached_and_leaves_the_weights_alone(tmp_path):
    model = small_model()
    fit(model, tmp_path, max_steps=4)
    loaded = load_model(tmp_path / "ckpt" / "last.ckpt")
    flags = [p.requires_grad for p in loaded.parameters()]
    before = [p.detach().clone() for p in loaded.parameters()]
    first = loaded.sample(2, "dpmpp_2m", steps=3, spacing="ld3", seed=0)
    assert first.shape == (2, 1, 16, 16) and torch.isfinite(first).all()
    assert [p.requires_grad for p in loaded.parameters()] == flags  # unfrozen again
    assert all(p.grad is None for p in loaded.parameters())  # the grid was fitted, not the network
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.parameters(), strict=True))
    records = json.loads((tmp_path / "ckpt" / "last.optimized_sigmas.json").read_text())
    assert [r["key"].get("spacing") for r in records] == ["ld3"] and records[0]["cost"]["network_evaluations"] > 0
    again = load_model(tmp_path / "ckpt" / "last.ckpt")  # a new process would start like this
    calls: list[int] = []
    net_forward = again.ema.module.forward
    again.ema.module.forward = lambda *a, **k: calls.append(1) or net_forward(*a, **k)
    second = again.sample(2, "dpmpp_2m", steps=3, spacing="ld3", seed=0)
    assert len(calls) == 3 and torch.equal(first, second)  # read from the cache: only the 3 sampling calls


def test_learned_sampler_fitted_once_per_checkpoint(tmp_path):
    model = small_model()
    fit(model, tmp_path, max_steps=4)
    calls: list[int] = []

    def counted(path):
        loaded = load_model(path)  # a new process would start like this
        net_forward = loaded.ema.module.forward
        loaded.ema.module.forward = lambda *a, **k: calls.append(1) or net_forward(*a, **k)
        return loaded

    first = counted(tmp_path / "ckpt" / "last.ckpt").sample(2, "learned", steps=3, seed=0)
    sequential = 16 * 2 + 1 + 3  # fine solution and the fit's own 3 steps
    # then the joint refinement: 3 chunks of 16 of the 48 noises it fits go through 3 steps per L-BFGS
    # evaluation, the 16 held-out ones through two solves; then sampling's 3 calls
    refinement = len(calls) - sequential - 3
    assert refinement >= 3 * 3 + 2 * 3 and (refinement - 2 * 3) % (3 * 3) == 0, len(calls)
    records = json.loads((tmp_path / "ckpt" / "last.optimized_sigmas.json").read_text())
    assert [r["key"]["kind"] for r in records] == ["learned_coefficients"] and len(records[0]["value"]) == 3
    assert records[0]["key"]["refine"] == 40  # weights from before the refinement would not be reused
    # the cost counts images through the network: the 64 noises' sequential fit, the refinement's
    assert records[0]["cost"]["network_evaluations"] == 64 * sequential + 16 * refinement
    calls.clear()
    second = counted(tmp_path / "ckpt" / "last.ckpt").sample(2, "learned", steps=3, seed=0)
    assert len(calls) == 3 and torch.equal(first, second)  # read from the cache: only the 3 sampling calls


def test_learned_optimized_grid_searched_with_the_fit_and_cached(tmp_path):
    model = small_model()
    fit(model, tmp_path, max_steps=4)
    loaded = load_model(tmp_path / "ckpt" / "last.ckpt")
    first = loaded.sample(2, "learned", steps=2, spacing="optimized", seed=0)
    records = json.loads((tmp_path / "ckpt" / "last.optimized_sigmas.json").read_text())
    grid, weights = records
    assert grid["key"]["sampler"] == "learned"
    assert grid["key"]["searched_for"] == "weights fitted from the top to the end"
    # every trial grid was fitted (16 + 1 + 2 calls) and run (2): far more than the reference's 511
    assert grid["cost"]["network_evaluations"] > 16 * (511 + 10 * (16 + 1 + 2 + 2))
    assert weights["key"]["kind"] == "learned_coefficients" and weights["key"]["sigmas"] == grid["value"]
    # the grid may start below the top; its weights aim at the solution from the top all the same
    assert weights["key"]["start_sigma"] == pytest.approx(loaded.schedule.sigma_max)
    assert weights["key"]["end_sigma"] == pytest.approx(loaded.schedule.sigma_min)
    again = load_model(tmp_path / "ckpt" / "last.ckpt")  # a new process would start like this
    calls: list[int] = []
    net_forward = again.ema.module.forward
    again.ema.module.forward = lambda *a, **k: calls.append(1) or net_forward(*a, **k)
    second = again.sample(2, "learned", steps=2, spacing="optimized", seed=0)
    assert len(calls) == 2 and torch.equal(first, second)  # grid and weights read from the cache


def test_learned_from_unipc_on_unipcs_grid_cached(tmp_path):
    # start_from: the grid is the one searched for UniPC (cheap: no fit per trial), the weights start
    # from UniPC's and are refined; both are cached, so a second run costs only its own calls
    model = small_model()
    fit(model, tmp_path, max_steps=4)
    loaded = load_model(tmp_path / "ckpt" / "last.ckpt")
    options = {"steps": 2, "spacing": "optimized", "form": "data", "start_from": "unipc", "seed": 0}
    first = loaded.sample(2, "learned", **options)
    grid, weights = json.loads((tmp_path / "ckpt" / "last.optimized_sigmas.json").read_text())
    assert grid["key"]["sampler"] == "unipc" and "searched_for" not in grid["key"]
    assert grid["cost"]["network_evaluations"] < 16 * (511 + 10 * (16 + 1 + 2 + 2))  # no fit per trial
    assert weights["key"]["start_from"] == "unipc" and weights["key"]["sigmas"] == grid["value"]
    assert weights["key"]["start_sigma"] == pytest.approx(loaded.schedule.sigma_max)
    loaded.sample(2, "unipc", steps=2, spacing="optimized", seed=0)  # sampler=unipc shares that grid
    assert len(json.loads((tmp_path / "ckpt" / "last.optimized_sigmas.json").read_text())) == 2
    again = load_model(tmp_path / "ckpt" / "last.ckpt")
    calls: list[int] = []
    net_forward = again.ema.module.forward
    again.ema.module.forward = lambda *a, **k: calls.append(1) or net_forward(*a, **k)
    assert torch.equal(first, again.sample(2, "learned", **options)) and len(calls) == 2
    with pytest.raises(ValueError, match="set sampler.form=data"):
        again.sample(2, "learned", steps=2, start_from="unipc")


def test_learned_start_chosen_among_samplers_and_cached(tmp_path):
    # start_from=[unipc, dpmpp_3m]: fitted from each, the one closer to the ODE solution on held-out noise
    # is kept; the fits and the choice are cached, so a second run (a Hydra list too) costs its own calls
    model = small_model()
    fit(model, tmp_path, max_steps=4)
    loaded = load_model(tmp_path / "ckpt" / "last.ckpt")
    options = {"steps": 2, "spacing": "trailing", "form": "data", "seed": 0}
    first = loaded.sample(2, "learned", start_from=["unipc", "dpmpp_3m"], **options)
    records = json.loads((tmp_path / "ckpt" / "last.optimized_sigmas.json").read_text())
    assert [r["key"].get("start_from") for r in records if r["key"]["kind"] == "learned_coefficients"] == [
        "unipc",
        "dpmpp_3m",
    ]
    (choice,) = [r for r in records if r["key"]["kind"] == "learned_start"]
    errors = choice["value"]["errors"]
    # (at 2 steps both refine to the same weights: a tie, which goes to the first listed)
    assert set(errors) == {"unipc", "dpmpp_3m"} and errors[choice["value"]["choice"]] == min(errors.values())
    assert choice["cost"]["network_evaluations"] == 32 * (257 + 2 + 2)  # the fine solution, then each candidate
    again = load_model(tmp_path / "ckpt" / "last.ckpt")
    calls: list[int] = []
    net_forward = again.ema.module.forward
    again.ema.module.forward = lambda *a, **k: calls.append(1) or net_forward(*a, **k)
    hydra_list = OmegaConf.create({"start_from": ["unipc", "dpmpp_3m"]}).start_from
    assert torch.equal(first, again.sample(2, "learned", start_from=hydra_list, **options)) and len(calls) == 2
    chosen = again.sample(2, "learned", start_from=choice["value"]["choice"], **options)
    assert torch.equal(first, chosen) and len(calls) == 4
    # a hand-edited choice (a sampler that was not a candidate) is ignored with a warning and measured again
    choice["value"]["choice"] = "ddim"
    (tmp_path / "ckpt" / "last.optimized_sigmas.json").write_text(json.dumps(records))
    with pytest.warns(UserWarning, match="ignoring an invalid entry"):
        again = load_model(tmp_path / "ckpt" / "last.ckpt")
        assert torch.equal(first, again.sample(2, "learned", start_from=["unipc", "dpmpp_3m"], **options))


def test_dynamic_threshold_option():
    model = small_model()
    out = model.sample(2, "ddim", steps=2, dynamic_threshold=0.9)
    assert out.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="percentile"):
        model.sample(2, "ddim", steps=2, dynamic_threshold=1.5)
