"""The sampling task behind sample.py: a checkpoint (or a diffusers UNet2DModel folder) in, a grid, an .npz and a
summary (with FID/KID/IS) out."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from fewstep.diffusion.sampling import resolve_batch_size
from fewstep.lit import DiffusionModel, load_model

log = logging.getLogger(__name__)
GRID_MAX = 256  # images shown in samples.png
GRID_ROW = 16  # images shown per condition (one row each) when several labels / prompts are sampled


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA GPU is available here; use device=cpu or device=auto")
    return device


def model_source(cfg: DictConfig) -> str:
    """What is sampled, for messages and summary.json: the checkpoint, or the diffusers folder."""
    return str(cfg.get("diffusers") or cfg.get("ckpt"))


def load_sampled_model(cfg: DictConfig, device: torch.device) -> DiffusionModel:
    """The model of ``ckpt=PATH`` (a fewstep checkpoint) or ``diffusers=FOLDER`` (a saved diffusers UNet2DModel).

    ``data=NAME`` (the data group) records the data it was trained on, for ``eval=true``, when the
    model does not (a diffusers folder), or replaces the checkpoint's record.
    """
    ckpt, folder = cfg.get("ckpt"), cfg.get("diffusers")
    if ckpt and folder:
        raise ValueError(f"give ckpt=PATH or diffusers=FOLDER, not both (got ckpt={ckpt} and diffusers={folder})")
    if folder:
        from fewstep.diffusers_compat import load_diffusers

        try:
            model = load_diffusers(folder, device=device)
        except ImportError as err:  # diffusers is an optional extra: a one-line error, not a traceback
            raise ValueError(str(err)) from None
    elif ckpt:
        model = load_model(ckpt, map_location=device)
    else:
        raise ValueError(
            "nothing to sample: give ckpt=PATH (a fewstep checkpoint) or diffusers=FOLDER "
            "(a saved diffusers DDPMPipeline or UNet2DModel)"
        )
    if cfg.get("data"):
        model.hparams["data"] = {
            k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "_target_"
        }
    return model


def build_scores(cfg: DictConfig, model: DiffusionModel, device: torch.device):  # -> GenerativeScores
    """FID/KID/IS against the data the checkpoint was trained on (its ``hparams.data``), features per ``cfg.features``.

    Trains the feature classifier and computes the reference statistics when they are not cached
    yet: before sampling starts, so the sampling time stays clean.
    """
    from fewstep.metrics import METRICS, GenerativeScores, build_features, reference_stats

    data = model.hparams.get("data")
    if not data:
        raise ValueError(
            f"{model_source(cfg)} does not record the data it was trained on: eval=true needs the real images, "
            "e.g. data=cifar10 (with data.root=DIR where they lie)"
        )
    options = OmegaConf.to_container(cfg.get("evaluation") or {}, resolve=True)
    data = {**data, **({"root": options["data_root"]} if options.get("data_root") else {})}
    features = OmegaConf.to_container(cfg.features, resolve=True) if cfg.get("features") else {"name": "auto"}
    extractor = build_features(features, data, device)
    metrics = tuple(options.get("metrics") or METRICS)
    if not set(metrics) <= set(METRICS):
        raise ValueError(f"unknown evaluation.metrics={list(metrics)}; choose from: {', '.join(METRICS)}")
    reference = reference_stats(
        data,
        extractor,
        split=options.get("split", "train"),
        cache_dir=features.get("cache_dir") or "logs/cache",
        max_kid_features=int(options.get("max_kid_features", 10_000)) if "kid" in metrics else 0,
    )
    return GenerativeScores(
        extractor,
        reference,
        metrics=metrics,
        kid_subsets=int(options.get("kid_subsets", 100)),
        kid_subset_size=int(options.get("kid_subset_size", 1000)),
        is_splits=int(options.get("is_splits", 10)),
        seed=int(options.get("seed", 0)),
    )


def sampler_overridden() -> bool:
    """Whether the command line set the sampler (``sampler=...`` or ``sampler.key=...``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    return any(o.lstrip("+~").split("=")[0].split(".")[0] == "sampler" for o in HydraConfig.get().overrides.task)


def choose_sampler(cfg: DictConfig, model: DiffusionModel) -> dict[str, Any]:
    """``cfg.sampler``; for a distilled student given no sampler on the command line, the one it was
    trained for (DDIM at a progressive student's steps, consistency sampling)."""
    if model.hparams.get("distillation") and not sampler_overridden():
        return dict(model.hparams.sampler)
    return OmegaConf.to_container(cfg.sampler, resolve=True)


def conditions(cfg: DictConfig, model: DiffusionModel) -> tuple[int, dict[str, Any], int]:
    """What to draw from ``cfg.y`` / ``cfg.prompt``: the total count, the ``sample`` keyword arguments
    (labels or prompts, one per sample) and the grid's row length (one row per listed condition)."""
    n = int(cfg.n)
    y, prompt = cfg.get("y"), cfg.get("prompt")
    if y is not None and prompt is not None:
        raise ValueError("give y= (class labels) or prompt= (text), not both")
    if y is not None:
        if not model.hparams.num_classes:
            raise ValueError(f"y={y} was given but {model_source(cfg)} was trained without class labels; drop y=")
        if y == "uniform":
            generator = torch.Generator().manual_seed(int(cfg.seed))
            return n, {"y": torch.randint(model.hparams.num_classes, (n,), generator=generator)}, 0
        labels = list(y) if OmegaConf.is_list(y) or isinstance(y, list | tuple) else [y]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise ValueError(f"y must be a class index, a list of them or 'uniform', got y={y}")
        k = model.hparams.num_classes
        if any(not 0 <= v < k for v in labels):
            raise ValueError(f"y={y} is outside the model's {k} classes; use labels 0..{k - 1}")
        return n * len(labels), {"y": torch.tensor(labels).repeat_interleave(n)}, n if len(labels) > 1 else 0
    if prompt is not None:
        if model.text_encoder is None:
            raise ValueError(f"prompt= was given but {model_source(cfg)} was trained without text; drop prompt=")
        if prompt in ("val", "train"):  # the captions of the data's split, in order (cycled when n is larger)
            from fewstep.data import DataSource, dataset_captions

            source = DataSource.from_config(model.hparams.data or {}).setup()
            captions = dataset_captions(source.val_set if prompt == "val" else source.train_set)
            return n, {"prompt": [captions[i % len(captions)] for i in range(n)]}, 0
        prompts = [str(p) for p in prompt] if OmegaConf.is_list(prompt) else [str(prompt)]
        return n * len(prompts), {"prompt": [p for p in prompts for _ in range(n)]}, n if len(prompts) > 1 else 0
    return n, {}, 0


def build_adherence(model: DiffusionModel, scores: Any) -> Any:  # -> Adherence
    """Adherence of conditional samples: the digit by the classifier features (when those are the FID
    features), stroke weight / slant / size by the caption rules of captioned MNIST-5k."""
    from fewstep.data import DataSource
    from fewstep.metrics.adherence import Adherence

    data = dict(model.hparams.data or {})
    classifier = scores.extractor if scores.features.startswith("classifier") else None
    rules = None
    if data.get("captions") and data.get("name") == "mnist5k":
        rules = DataSource.from_config(data).setup().caption_rules
    return Adherence(classifier, rules)


def sample(cfg: DictConfig) -> dict:
    """Draw ``cfg.n`` samples; write samples.png, samples.npz and summary.json to ``cfg.out_dir``.

    Samples are drawn ``cfg.batch_size`` at a time; with ``eval=true`` each batch is scored as it
    comes (the metrics keep features, not images), and ``save_npz=false`` keeps no image at all
    beyond the grid's. Sample i depends on (``seed``, i) only, not on the batch size.
    """
    if not isinstance(cfg.n, int) or cfg.n < 1:
        raise ValueError(f"n must be an integer >= 1, got {cfg.n!r}")
    evaluate = bool(cfg.get("eval", False))
    if evaluate and cfg.n < 2:
        raise ValueError(f"eval=true needs n >= 2 samples (FID fits a covariance), got n={cfg.n}")
    save_npz = bool(cfg.get("save_npz", True))
    device = pick_device(cfg.device)
    batch_size = resolve_batch_size(cfg.batch_size, device)  # bad input fails before the model loads
    model = load_sampled_model(cfg, device)
    sampler_cfg = choose_sampler(cfg, model)
    spec = model.sampler_spec(sampler_cfg)
    guidance_cfg = OmegaConf.to_container(cfg.guidance, resolve=True) if cfg.get("guidance") else None
    model.guidance(guidance_cfg)  # bad guidance input fails before anything is computed
    total, condition, row = conditions(cfg, model)
    scores = build_scores(cfg, model, device) if evaluate else None
    adherence = build_adherence(model, scores) if scores is not None and condition else None
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept: list[torch.Tensor] = []  # uint8 samples for the .npz
    shown: list[torch.Tensor] = []  # the first GRID_MAX samples (or row length per condition) for the grid
    seconds, eval_seconds, nfe = 0.0, 0.0, 0.0
    ran = spec
    with tqdm(total=total, desc=f"{spec.name} x{spec.steps}", unit="img") as bar:
        for result in model.sample_batches(
            total,
            sampler_cfg,
            seed=int(cfg.seed),
            batch_size=batch_size,
            guidance=guidance_cfg,
            use_ema=cfg.ema,
            **condition,
        ):
            bar.update(len(result.images))
            seconds, nfe = seconds + result.seconds, max(nfe, result.nfe)
            ran = result.spec or ran  # what ran: learned's fitted weights, and the start it chose from a list
            if scores is not None:
                start = time.perf_counter()
                scores.update(result.images)
                if adherence is not None:
                    rows = list(result.indices)
                    adherence.update(
                        result.images,
                        condition["y"][rows] if "y" in condition else None,
                        [condition["prompt"][i] for i in rows] if "prompt" in condition else None,
                    )
                eval_seconds += time.perf_counter() - start
            images = result.images.float().cpu()
            if save_npz:
                kept.append(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
            keep = [j for j, i in enumerate(result.indices) if _shown(i, row)]
            shown.append(images[keep])
    if save_npz:
        arrays = {"images": torch.cat(kept).permute(0, 2, 3, 1).numpy()}
        if "y" in condition:
            arrays["y"] = condition["y"].numpy()
        if "prompt" in condition:
            arrays["prompt"] = np.array(condition["prompt"])
        np.savez_compressed(out_dir / "samples.npz", **arrays)
    grid = torch.cat(shown)
    nrow = min(row, GRID_ROW) if row else int(math.ceil(math.sqrt(len(grid))))
    save_image(make_grid((grid + 1) / 2, nrow=nrow, pad_value=1.0), out_dir / "samples.png")
    summary: dict[str, Any] = {
        **({"diffusers": str(cfg.diffusers)} if cfg.get("diffusers") else {"ckpt": str(cfg.ckpt)}),
        "sampler": spec.name,
        "steps": spec.steps,
        "spacing": spec.spacing,
        "options": ran.options,
        "guidance": guidance_cfg or {"name": "none"},
        "nfe": nfe,  # network evaluations per image: a batched CFG step counts 2
        "n": total,
        "seconds": seconds,
        "seconds_per_image": seconds / total,
        "images_per_second": total / seconds if seconds > 0 else math.inf,
        "device": str(device),
        "batch_size": batch_size,  # the time per image depends on it (batch_size=auto: 64 on a CPU)
        "ema": bool(cfg.ema and model.ema is not None),
        "seed": int(cfg.seed),
    }
    if "y" in condition:
        summary["y"] = OmegaConf.to_container(cfg, resolve=True)["y"]
    if "prompt" in condition:
        summary["prompts"] = list(dict.fromkeys(condition["prompt"]))
        if cfg.prompt in ("val", "train"):
            summary["prompt_source"] = f"{cfg.prompt} captions"
        else:
            summary["samples_per_prompt"] = int(cfg.n)
    if scores is not None:
        start = time.perf_counter()
        values = scores.compute()
        eval_seconds += time.perf_counter() - start
        summary.update({k: v for k, v in values.items() if k not in ("n", "reference_n")})
        summary["reference"] = {
            "data": model.hparams.data.get("name"),
            "split": (cfg.get("evaluation") or {}).get("split", "train"),
            "image_size": model.hparams.data.get("image_size"),
            "n": values["reference_n"],
        }
        if adherence is not None:
            summary["adherence"] = adherence.compute()
        summary["eval_seconds"] = eval_seconds
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "%d samples in %.2fs (%.1f img/s, NFE %g) -> %s",
        total,
        seconds,
        summary["images_per_second"],
        nfe,
        out_dir,
    )
    if scores is not None:
        log.info(
            "FID %.3f  KID %s  IS %s  (%s, %.1fs)",
            summary.get("fid", math.nan),
            _fmt(summary.get("kid_mean")),
            _fmt(summary.get("is_mean")),
            summary["features"],
            eval_seconds,
        )
    return summary


def _shown(index: int, row: int) -> bool:
    """Whether sample ``index`` is in the grid: the first GRID_ROW of each condition's row, or the first GRID_MAX."""
    return index % row < GRID_ROW if row else index < GRID_MAX


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
