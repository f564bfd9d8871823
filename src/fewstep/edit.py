"""The editing task behind edit.py: images in, inpainted / SDEdited / inverted / re-conditioned images out.

Inputs are a PNG, a folder of images or ``input=val`` (the checkpoint's own validation images, with
their labels). Writes ``edits.png`` (one row each: input, masked input or latent, result), ``edits.npz``
and ``summary.json`` (NFE, seconds, RMSE to the input; with ``eval=true`` FID and the classifier's
digit accuracy).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from fewstep.diffusion.sampling import MODEL_SPACINGS, CountingDenoiser, sample_seeds
from fewstep.lit import DiffusionModel, load_model
from fewstep.sample import build_adherence, build_scores, choose_sampler, pick_device
from fewstep.samplers import SampleGenerators, get_sampler
from fewstep.tasks import MASKS, check_mask, edit, inpaint, invert, load_mask, make_masks, sdedit, start_index
from fewstep.tasks.editing import check_invertible

log = logging.getLogger(__name__)
TASKS = ("inpaint", "sdedit", "invert", "edit")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
GRID_COLUMNS = 16


@dataclass
class Inputs:
    images: Tensor  # [N, C, H, W] in [-1, 1]
    labels: Tensor | None = None  # true labels, when the input is the model's data
    captions: list[str] | None = None
    names: list[str] | None = None


def load_inputs(cfg: DictConfig, model: DiffusionModel) -> Inputs:
    """``cfg.input``: ``val`` / ``train`` (the checkpoint's data split), a folder or one image file; first ``cfg.n``."""
    n, source = int(cfg.n), str(cfg.input)
    channels, size = model.hparams.channels, model.hparams.image_size
    if source in ("val", "train"):
        from fewstep.data import DataSource

        data = DataSource.from_config(model.hparams.data or {}).setup()
        split = data.val_set if source == "val" else data.train_set
        if split is None or len(split) == 0:
            raise ValueError(f"the checkpoint's data has no {source} split; give input=train or a folder of images")
        items = [split[i] for i in range(min(n, len(split)))]
        labels = [item[1] for item in items] if len(items[0]) > 1 else None
        return Inputs(
            torch.stack([item[0] for item in items]).float(),
            torch.as_tensor(labels, dtype=torch.long) if labels is not None and labels[0] is not None else None,
            [str(item[2]) for item in items] if len(items[0]) > 2 else None,
            [f"{source}[{i}]" for i in range(len(items))],
        )
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"input folder {path} has no images ({', '.join(IMAGE_SUFFIXES)})")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"input={source} is not a file or folder; give a PNG, a folder of images, or input=val")
    images = [read_image(f, channels, size, bool(cfg.resize)) for f in files[:n]]
    return Inputs(torch.stack(images), names=[f.name for f in files[:n]])


def read_image(path: Path, channels: int, size: int, resize: bool) -> Tensor:
    """One image as ``[C, H, W]`` in [-1, 1]; a channel count or size other than the model's is an
    error unless ``resize`` (then it is converted and resized)."""
    from PIL import Image

    with Image.open(path) as img:
        bands = 1 if img.mode in ("1", "L", "I", "F", "LA") else 3
        if bands != channels and not resize:
            raise ValueError(
                f"{path.name} has {bands} channel(s) but the model takes {channels}: convert it, or resize=true"
            )
        if img.size != (size, size) and not resize:
            raise ValueError(
                f"{path.name} is {img.size[1]}x{img.size[0]} but the model takes {size}x{size}: resize=true scales it"
            )
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).reshape(size, size, channels).permute(2, 0, 1).contiguous()


def _condition_values(value: Any, inputs: Inputs, kind: str) -> Any:
    """``y`` / ``prompt`` values: ``input`` means the input's own labels / captions."""
    if value != "input":
        return OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    known = inputs.labels if kind == "y" else inputs.captions
    if known is None:
        raise ValueError(
            f"{kind}=input needs inputs with known {'labels' if kind == 'y' else 'captions'}: use input=val"
        )
    return known


def condition(
    model: DiffusionModel, n: int, inputs: Inputs, y: Any, prompt: Any, use_ema: bool, rows: slice
) -> dict[str, Tensor]:
    y, prompt = _condition_values(y, inputs, "y"), _condition_values(prompt, inputs, "prompt")
    if torch.is_tensor(y) or isinstance(y, list):
        y = torch.as_tensor(y)[rows] if len(y) > 1 else y
    if isinstance(prompt, list) and len(prompt) > 1:
        prompt = prompt[rows]
    return model.condition(n, y, prompt, use_ema)


def task_options(cfg: DictConfig) -> dict[str, Any]:
    options = OmegaConf.to_container(cfg.task, resolve=True)
    name = options.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return {"name": name, **options}


def build_masks(options: dict[str, Any], inputs: Inputs, seed: int, resize: bool) -> Tensor:
    kind = str(options.get("mask", "center"))
    n, _, size, _ = inputs.images.shape
    masks = (
        make_masks(kind, n, size, seed)
        if kind in MASKS
        else load_mask(kind, (size, size), resize).expand(n, -1, -1, -1)
    )
    return check_mask(masks, inputs.images)


def run_task(cfg: DictConfig) -> dict:
    """Run ``cfg.task`` on ``cfg.input`` and write the grid, ``edits.npz`` and ``summary.json``."""
    if not isinstance(cfg.n, int) or cfg.n < 1:
        raise ValueError(f"n must be an integer >= 1, got {cfg.n!r}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {cfg.batch_size!r}")
    task = task_options(cfg)
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt, map_location=device)
    model.eval()
    spec = model.sampler_spec(choose_sampler(cfg, model))
    guidance_cfg = OmegaConf.to_container(cfg.guidance, resolve=True) if cfg.get("guidance") else None
    guidance = model.guidance(guidance_cfg, cfg.ema)
    if task["name"] in ("invert",) and guidance.scale != 1:
        raise ValueError("task=invert runs the plain model (a guided ODE does not invert stably): drop guidance=cfg")
    if task["name"] in ("invert", "edit"):
        check_invertible(spec.name, spec.options)
    if task["name"] == "edit":
        if not model.conditions:
            raise ValueError("task=edit changes the condition: it needs a model trained with labels or text")
        if task.get("target_y") is None and task.get("target_prompt") is None:
            raise ValueError("task=edit needs a target: task.target_y=LABEL or task.target_prompt='...'")
    if task["name"] in ("sdedit", "edit"):
        start_index(spec.steps, task.get("strength", 1.0))  # a bad strength fails before anything runs
    inputs = load_inputs(cfg, model)
    masks = build_masks(task, inputs, int(cfg.seed), bool(cfg.resize)) if task["name"] == "inpaint" else None
    sigmas = model.optimized_sigmas(spec, cfg.ema) if spec.spacing in MODEL_SPACINGS else spec.sigmas(model.schedule)
    evaluate = bool(cfg.get("eval", False))
    if evaluate and len(inputs.images) < 2:
        raise ValueError("eval=true needs n >= 2 images (FID fits a covariance)")
    scores = build_scores(cfg, model, device) if evaluate else None
    accuracy = build_adherence(model, scores) if scores is not None else None

    total = len(inputs.images)
    results, latents, nfe, seconds = [], [], {}, 0.0
    squared, counted = 0.0, 0.0
    with tqdm(total=total, desc=f"{task['name']} {spec.name} x{spec.steps}", unit="img") as bar:
        for begin in range(0, total, int(cfg.batch_size)):
            rows = slice(begin, min(begin + int(cfg.batch_size), total))
            image = inputs.images[rows].to(device)
            n = len(image)
            generators = SampleGenerators(sample_seeds(int(cfg.seed), range(rows.start, rows.stop)), device)
            plain = CountingDenoiser(model.denoiser(cfg.ema), batch=n)
            guided_counter = CountingDenoiser(model.denoiser(cfg.ema), batch=n)
            guided = spec.wrap(guidance.wrap(guided_counter))
            cond = condition(model, n, inputs, cfg.get("y"), cfg.get("prompt"), cfg.ema, rows)
            start = time.perf_counter()
            latent = None
            if task["name"] == "inpaint":
                out = inpaint(
                    guided,
                    image,
                    masks[rows].to(device),
                    sigmas,
                    method=task.get("method", "ddnm"),
                    sampler=spec.name,
                    generator=generators,
                    cond=cond,
                    jump_length=task.get("jump_length"),
                    resample=task.get("resample"),
                    known_noise=task.get("known_noise", "fixed"),
                    **spec.options,
                )
            elif task["name"] == "sdedit":
                out = sdedit(
                    guided, image, task.get("strength", 0.5), sigmas, sampler=spec.name, generator=generators,
                    cond=cond, **spec.options,
                )  # fmt: skip
            elif task["name"] == "invert":
                latent = invert(plain, image, sigmas, sampler=spec.name, cond=cond, **spec.options)
                out = get_sampler(spec.name)(guided, latent, sigmas, cond=cond, **spec.options)
            else:
                strength = task.get("strength", 1.0)
                source = condition(
                    model, n, inputs, task.get("source_y", "input"), task.get("source_prompt"), cfg.ema, rows
                )
                target = condition(model, n, inputs, task.get("target_y"), task.get("target_prompt"), cfg.ema, rows)
                out = edit(
                    plain, image, sigmas, source=source, target=target, strength=strength, sampler=spec.name,
                    target_denoiser=guided, **spec.options,
                )  # fmt: skip
            out = out.clamp(-1, 1)
            seconds += time.perf_counter() - start
            nfe = {"invert": plain.calls, "generate": guided_counter.calls} if plain.calls else guided_counter.calls
            if masks is not None:
                filled = masks[rows].to(device)
                squared += float(((out - image) ** 2 * filled).sum())
                counted += float(filled.sum())
            else:
                squared += float(((out - image) ** 2).sum())
                counted += out.numel()
            if scores is not None:
                scores.update(out)
                labels = inputs.labels
                if task["name"] == "edit" and task.get("target_y") is not None:
                    labels = torch.as_tensor(_condition_values(task["target_y"], inputs, "y")).expand(total)
                if labels is not None and accuracy is not None:
                    accuracy.update(out, labels[rows], None)
            results.append(out.cpu())
            if latent is not None:
                latents.append(latent.cpu())
            bar.update(n)
    result = torch.cat(results)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_grid(out_dir / "edits.png", inputs.images, result, masks, torch.cat(latents) if latents else None)
    arrays: dict[str, np.ndarray] = {"inputs": _uint8(inputs.images), "results": _uint8(result)}
    if masks is not None:
        arrays["masks"] = masks.bool().numpy()
    if latents:
        arrays["latents"] = torch.cat(latents).numpy()
    if inputs.labels is not None:
        arrays["labels"] = inputs.labels.numpy()
    np.savez_compressed(out_dir / "edits.npz", **arrays)
    total_nfe = sum(nfe.values()) if isinstance(nfe, dict) else nfe
    summary: dict[str, Any] = {
        "ckpt": str(cfg.ckpt),
        "task": task,
        "input": str(cfg.input),
        "n": total,
        "sampler": spec.name,
        "steps": spec.steps,
        "spacing": spec.spacing,
        "options": spec.options,
        "guidance": guidance_cfg or {"name": "none"},
        "nfe": total_nfe,  # network evaluations per image (a guided step counts 2)
        "seconds": seconds,
        "seconds_per_image": seconds / total,
        # in [0, 1] pixel units: over the filled pixels (inpaint), else the whole image
        "rmse": math.sqrt(squared / counted) / 2,
        "device": str(device),
        "seed": int(cfg.seed),
    }
    if isinstance(nfe, dict):
        summary["nfe_parts"] = nfe
    if scores is not None:
        values = scores.compute()
        summary.update({k: v for k, v in values.items() if k not in ("n", "reference_n")})
        if accuracy is not None and accuracy.asked["digit"]:
            summary["accuracy"] = accuracy.compute()["digit"]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "%s: %d images in %.2fs (NFE %g), RMSE %.4f%s -> %s",
        task["name"],
        total,
        seconds,
        total_nfe,
        summary["rmse"],
        f", FID {summary['fid']:.2f}" if "fid" in summary else "",
        out_dir,
    )
    return summary


def save_grid(path: Path, images: Tensor, results: Tensor, masks: Tensor | None, latents: Tensor | None) -> None:
    """Rows: the input, the masked input (grey where filled) or the latent (scaled), the result."""
    k = min(GRID_COLUMNS, len(images))
    rows = [images[:k]]
    if masks is not None:
        rows.append(torch.where(masks[:k].bool(), torch.zeros_like(images[:k]), images[:k]))
    if latents is not None:
        scale = latents[:k].flatten(1).std(1).clamp(min=1e-8).view(-1, 1, 1, 1)
        rows.append((latents[:k] / (3 * scale)).clamp(-1, 1))
    rows.append(results[:k])
    save_image(make_grid((torch.cat(rows) + 1) / 2, nrow=k, pad_value=1.0), path)


def _uint8(images: Tensor) -> np.ndarray:
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
