"""Sample diffusers ``UNet2DModel`` pixel models with fewstep's samplers.

A saved diffusers model (a ``DDPMPipeline`` / ``DDIMPipeline`` folder with ``unet/`` and ``scheduler/``,
or a bare ``UNet2DModel`` folder) is a network trained in the variance-preserving (VP) form

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,     abar_t = prod_{s<=t} (1 - beta_s),

at integer timesteps ``t``, on the betas its scheduler config names. That is exactly fewstep's network
contract (docs/contract.md, 1), so :class:`DiffusersUNet` adapts the UNet's call signature and the
model becomes an ordinary :class:`~fewstep.lit.DiffusionModel`: its :class:`~fewstep.diffusion.Parameterisation`
does the VE <-> VP mapping of every fewstep denoiser,

    x_vp = x / sqrt(1 + sigma^2),   t = t(sigma) with sigma_t = sqrt((1 - abar_t) / abar_t)
    (log-sigma interpolation between training timesteps),

and turns the UNet's eps / v / x0 output into the x0 estimate. So every sampler, spacing (``optimized``
included), ``model.sample`` and ``sample.py diffusers=FOLDER`` work unchanged.

diffusers is optional (``pip install 'fewstep[diffusers]'``) and imported only here, when a model is loaded.
Weights load through diffusers' ``from_pretrained`` from local files only: safetensors, or a ``.bin``
read with ``torch.load(weights_only=True)``; nothing in the folder is executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.lit.module import DiffusionModel
from fewstep.utils import file_digest

__all__ = ["DiffusersUNet", "find_diffusers_files", "load_diffusers", "schedule_options"]

INSTALL_HINT = "pip install 'fewstep[diffusers]'"
# diffusers' beta_schedule -> fewstep's schedule: betas equal to float32 rounding (alpha_bar to ~3e-7)
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
LEARNED_VARIANCE = ("learned", "learned_range")
FOLDER_HINT = "give the folder of a saved DDPMPipeline (unet/ + scheduler/) or of a UNet2DModel (config.json)"


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"loading a diffusers model needs diffusers: {INSTALL_HINT}") from None
    return diffusers


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` with fewstep's network signature ``net(x_t, t, *, y=None, ...)``.

    ``t`` may be fractional: the UNet's sinusoidal (``positional``) embedding takes any real timestep.
    A UNet that learned its variance too (``out_channels = 2 * in_channels``, DDPM++ / improved DDPM)
    returns ``[prediction, variance]``; only the prediction is kept, as diffusers' DDPM pipeline does.

    Built like every fewstep network (``_target_: fewstep.diffusers_compat.DiffusersUNet`` with the UNet's
    ``config``), so a :class:`~fewstep.lit.DiffusionModel` holds it; :func:`load_diffusers` loads the weights.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        image_size: int,
        in_channels: int,
        num_classes: int | None = None,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None or context_dim is not None:
            raise ValueError("a diffusers UNet2DModel is sampled unconditionally here: no num_classes / text_encoder")
        check_unet_config(config)
        if int(config["in_channels"]) != in_channels:
            raise ValueError(f"the UNet takes {config['in_channels']} channels, not {in_channels}")
        self.unet = _import_diffusers().UNet2DModel.from_config(dict(config))
        self.image_size, self.in_channels = image_size, in_channels

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        y: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        if y is not None or context is not None:
            raise ValueError("this diffusers UNet2DModel is unconditional: sample it without y / prompt")
        out = self.unet(x, t).sample
        return out[:, : self.in_channels]  # a learned variance's channels follow the prediction's


def check_unet_config(config: Mapping[str, Any], where: str = "the UNet config") -> None:
    """One-line errors for the UNet2DModel variants fewstep cannot sample (before any weight is read)."""
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(
            f"{where} describes a {cls}, not a UNet2DModel: only diffusers' unconditional pixel-space "
            "UNet2DModel is supported (not UNet2DConditionModel or latent pipelines)"
        )
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise ValueError(f"{where} is a class-conditional UNet2DModel (num_class_embeds); only unconditional ones work")
    embedding = config.get("time_embedding_type", "positional")
    if embedding != "positional":
        raise ValueError(
            f"{where} has time_embedding_type={embedding!r}; fewstep needs 'positional' (a DDPM-timestep UNet: "
            "'fourier' ones are score-SDE models of sigma, 'learned' ones take integer timesteps only)"
        )
    channels, out = int(config.get("in_channels", 3)), int(config.get("out_channels", 3))
    if out not in (channels, 2 * channels):
        raise ValueError(f"{where} maps {channels} channels to {out}; fewstep needs out_channels == in_channels")


def schedule_options(scheduler_config: Mapping[str, Any], where: str = "the scheduler config") -> dict[str, Any]:
    """The :class:`~fewstep.lit.DiffusionModel` options of a diffusers DDPM-type scheduler config.

    ``beta_schedule`` ``linear`` -> fewstep's linear schedule (``beta_start``, ``beta_end``),
    ``squaredcos_cap_v2`` -> the cosine one (Nichol & Dhariwal 2021, s = 0.008, betas capped at 0.999:
    diffusers' ``betas_for_alpha_bar``); ``prediction_type`` epsilon / v_prediction / sample -> eps / v / x0;
    ``clip_sample`` (and ``clip_sample_range``) -> ``clip_x0``, the clamp of the x0 estimate.
    """
    if "beta_schedule" not in scheduler_config or "num_train_timesteps" not in scheduler_config:
        cls = scheduler_config.get("_class_name", "?")
        raise ValueError(
            f"{where} ({cls}) is not a DDPM-type scheduler with betas (beta_schedule, num_train_timesteps)"
        )
    supported = ", ".join(BETA_SCHEDULES)
    if scheduler_config.get("trained_betas") is not None:
        raise ValueError(f"{where} gives trained_betas; fewstep supports beta_schedule: {supported}")
    if scheduler_config.get("rescale_betas_zero_snr"):
        raise ValueError(f"{where} sets rescale_betas_zero_snr (infinite sigma_max); fewstep supports it off only")
    beta_schedule = scheduler_config["beta_schedule"]
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"{where} has beta_schedule={beta_schedule!r}, which fewstep lacks; supported: {supported}")
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{where} has prediction_type={prediction!r}; supported: {', '.join(PREDICTION_TYPES)}")
    # clip_sample: DDPM's and DDIM's default True; schedulers without it (Euler, DPM-Solver) never clip
    clip = scheduler_config.get("clip_sample", False)
    options: dict[str, Any] = {
        "schedule": BETA_SCHEDULES[beta_schedule],
        "num_timesteps": int(scheduler_config["num_train_timesteps"]),
        "prediction": PREDICTION_TYPES[prediction],
        "clip_x0": float(scheduler_config.get("clip_sample_range", 1.0)) if clip else None,
    }
    if beta_schedule == "linear":
        options.update(beta_start=float(scheduler_config["beta_start"]), beta_end=float(scheduler_config["beta_end"]))
    return options


def find_diffusers_files(path: str | os.PathLike, subfolder: str | None = None) -> tuple[Path, Path]:
    """The UNet folder (``config.json`` + weights) and the scheduler config of a saved diffusers model.

    ``path`` is a pipeline folder (``unet/``, ``scheduler/``), or the UNet's own folder with
    ``scheduler_config.json`` beside its ``config.json`` or in ``../scheduler/``; ``subfolder`` names
    the UNet's folder inside ``path`` when it is not ``unet``.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"diffusers={path} is not a folder; {FOLDER_HINT}")
    if subfolder is not None:
        unet_dir = root / subfolder
    elif (root / "unet" / "config.json").is_file():
        unet_dir = root / "unet"
    else:
        unet_dir = root
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"{unet_dir} has no config.json; {FOLDER_HINT}")
    candidates = [
        unet_dir / "scheduler_config.json",
        unet_dir.parent / "scheduler" / "scheduler_config.json",
        root / "scheduler" / "scheduler_config.json",
        root / "scheduler_config.json",
    ]
    scheduler = next((c for c in candidates if c.is_file()), None)
    if scheduler is None:
        raise FileNotFoundError(
            f"no scheduler config for {unet_dir}: put the scheduler's scheduler_config.json beside its "
            "config.json or in ../scheduler/ (the pipeline layout)"
        )
    return unet_dir, scheduler


def load_diffusers(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    subfolder: str | None = None,
    image_size: int | None = None,
    clip_x0: float | None | str = "scheduler",
) -> DiffusionModel:
    """A saved diffusers ``UNet2DModel`` (with its scheduler config) as a fewstep :class:`DiffusionModel`.

    Use it like a loaded checkpoint: ``model.sample(16, "dpmpp_2m", steps=10)``, ``model.denoiser()``
    (the contract's ``D(x, sigma) -> x0``) with any sampler in ``fewstep.samplers.SAMPLERS``, or
    ``python sample.py diffusers=FOLDER``. ``image_size`` defaults to the config's ``sample_size``;
    ``clip_x0`` to the scheduler's ``clip_sample`` / ``clip_sample_range`` (a number or ``None`` overrides).
    Optimized grids (``spacing=optimized``) are cached beside the weights when that folder is writable.
    """
    unet_dir, scheduler_file = find_diffusers_files(path, subfolder)
    unet_config = _read_json(unet_dir / "config.json")
    check_unet_config(unet_config, str(unet_dir / "config.json"))
    options = schedule_options(_read_json(scheduler_file), str(scheduler_file))
    if clip_x0 != "scheduler":
        options["clip_x0"] = clip_x0
    size = image_size if image_size is not None else _square_size(unet_config.get("sample_size"), unet_dir)
    diffusers = _import_diffusers()
    try:
        pretrained = diffusers.UNet2DModel.from_pretrained(
            str(unet_dir), local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the UNet2DModel weights in {unet_dir}: {reason}") from None
    model = DiffusionModel(
        image_size=size,
        channels=int(unet_config.get("in_channels", 3)),
        net={"_target_": f"{__name__}.DiffusersUNet", "config": _unet_options(pretrained.config)},
        ema_decay=None,
        **options,
    )
    model.net.unet.load_state_dict(pretrained.state_dict())
    del pretrained
    weights = sorted(unet_dir.glob("diffusion_pytorch_model*.safetensors")) or sorted(
        unet_dir.glob("diffusion_pytorch_model*.bin")
    )
    if weights and os.access(unet_dir, os.W_OK):
        model.checkpoint_id = file_digest(weights[0])
        model.sigmas_cache = unet_dir / "fewstep.optimized_sigmas.json"
    model.diffusers_path = str(path)
    return model.to(device).eval()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path} ({type(err).__name__}: {err})") from None


def _square_size(sample_size: Any, where: Path) -> int:
    """fewstep's ``image_size`` of the UNet's ``sample_size`` (an int, or a square [h, w])."""
    sizes = list(sample_size) if isinstance(sample_size, list | tuple) else [sample_size]
    if not all(isinstance(s, int) for s in sizes) or len(set(sizes)) != 1:
        raise ValueError(
            f"{where}/config.json has sample_size={sample_size!r}; fewstep samples square images: "
            "pass load_diffusers(..., image_size=N)"
        )
    return sizes[0]


def _unet_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The UNet's constructor options as plain data (the model's hyper-parameters), without diffusers'
    bookkeeping keys (``_name_or_path``, ``_diffusers_version``, ...) but for ``_class_name``."""
    return {
        str(k): list(v) if isinstance(v, tuple) else v
        for k, v in config.items()
        if not str(k).startswith("_") or k == "_class_name"
    }
