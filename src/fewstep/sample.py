"""The sampling task behind sample.py: a checkpoint in, a grid, an .npz and a summary out."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from fewstep.diffusion.sampling import SamplerSpec
from fewstep.lit import load_model

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA GPU is available here; use device=cpu or device=auto")
    return device


def sample(cfg: DictConfig) -> dict:
    """Draw ``cfg.n`` samples; write samples.png, samples.npz and summary.json to ``cfg.out_dir``."""
    if cfg.n < 1:
        raise ValueError(f"n must be >= 1, got {cfg.n}")
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt, map_location=device)
    sampler_cfg = OmegaConf.to_container(cfg.sampler, resolve=True)
    spec = SamplerSpec.from_config(sampler_cfg)
    if (
        model.hparams.schedule
        and spec.steps > model.schedule.num_timesteps
        and spec.spacing in ("trailing", "quadratic")
    ):
        raise ValueError(f"sampler.steps={spec.steps} exceeds the model's {model.schedule.num_timesteps} timesteps")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    with tqdm(total=cfg.n, desc=f"{spec.name} x{spec.steps}", unit="img") as bar:
        result = model.sample(
            cfg.n,
            sampler_cfg,
            generator=generator,
            batch_size=cfg.batch_size,
            use_ema=cfg.ema,
            return_result=True,
            progress=bar.update,
        )
    images = result.images.float().cpu()
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    np.savez_compressed(out_dir / "samples.npz", images=uint8.permute(0, 2, 3, 1).numpy())
    shown = images[: min(len(images), 256)]
    save_image(
        make_grid((shown + 1) / 2, nrow=int(math.ceil(math.sqrt(len(shown)))), pad_value=1.0), out_dir / "samples.png"
    )
    summary = {
        "ckpt": str(cfg.ckpt),
        "sampler": spec.name,
        "steps": spec.steps,
        "spacing": spec.spacing,
        "options": spec.options,
        "nfe": result.nfe,
        "n": cfg.n,
        "seconds": result.seconds,
        "seconds_per_image": result.seconds / cfg.n,
        "images_per_second": result.images_per_second,
        "device": str(device),
        "ema": bool(cfg.ema and model.ema is not None),
        "seed": int(cfg.seed),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "%d samples in %.2fs (%.1f img/s, NFE %d) -> %s",
        cfg.n,
        result.seconds,
        result.images_per_second,
        result.nfe,
        out_dir,
    )
    return summary
