"""The training task behind train.py: instantiate data, model, callbacks, loggers; fit."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from fewstep.lit import DiffusionModel, ImageDataModule, load_checkpoint
from fewstep.lit.checkpoint import AtomicCheckpointIO
from fewstep.lit.module import check_architecture
from fewstep.nn.text import WordTokenizer
from fewstep.precision import device_kind, probe_speedup, resolve_precision

log = logging.getLogger(__name__)


class _NoProductTips(logging.Filter):
    """Drop the "Tip: try installing litlogger / litmodels" lines Lightning prints on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Tip:" in message and ("litlogger" in message or "litmodels" in message))


for _name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoProductTips())


def build_model(cfg: DictConfig, datamodule: ImageDataModule) -> DiffusionModel:
    """The LightningModule from the model/, schedule/, sampler/, guidance/ and text_encoder/ groups and
    the module options. A text encoder that builds its vocabulary (``vocab``) gets it from the
    training captions."""
    schedule = OmegaConf.to_container(cfg.schedule, resolve=True)
    module = OmegaConf.to_container(cfg.module, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if "net" not in model:
        raise ValueError("the model config needs a net: node with a _target_ (see conf/model/tiny.yaml)")
    text_encoder = OmegaConf.to_container(cfg.text_encoder, resolve=True) if cfg.get("text_encoder") else None
    if text_encoder is not None:
        if not getattr(datamodule, "captions", False):
            raise ValueError(
                f"text_encoder={text_encoder.get('_target_', '?').rsplit('.', 1)[-1]} needs captioned data: "
                "use data=mnist5k_captions or data=folder data.captions=true (a metadata.jsonl with texts)"
            )
        if "vocab" in inspect.signature(get_class(text_encoder["_target_"])).parameters and not text_encoder.get(
            "vocab"
        ):
            datamodule.setup("fit")
            text_encoder["vocab"] = WordTokenizer.build(datamodule.train_captions())
    guidance = OmegaConf.to_container(cfg.guidance, resolve=True) if cfg.get("guidance") else None
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    teacher = None
    if module.get("distillation"):
        teacher = module["distillation"].get("teacher")
        sampler = None  # the student's own: DDIM at its steps, or consistency sampling
        if teacher:
            architecture = teacher_architecture(teacher, datamodule, module)
            model, schedule = {"net": architecture.pop("net")}, architecture.pop("schedule")
            text_encoder = architecture.pop("text_encoder")
            module.update(architecture)
    built = DiffusionModel(
        image_size=datamodule.image_size,
        channels=datamodule.channels,
        net=model["net"],
        sampler=sampler,
        guidance=guidance,
        text_encoder=text_encoder,
        data={k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "_target_"},
        **schedule,
        **module,
    )
    if teacher:
        init_from_teacher(built, teacher)
    return built


# What a student takes from its teacher: the network and everything its outputs depend on.
TEACHER_KEYS = ("net", "prediction", "num_classes", "text_encoder", "clip_x0")
SCHEDULE_KEYS = ("schedule", "beta_start", "beta_end", "num_timesteps", "cosine_s")


def teacher_architecture(path: str, datamodule: ImageDataModule, module: dict) -> dict:
    """The teacher's network, schedule and conditions, which the student inherits; one-line errors
    when the data or the conditioning asked for differ from the teacher's."""
    hp = load_checkpoint(path)["hyper_parameters"]
    shape = (hp.get("channels"), hp.get("image_size"))
    if shape != (datamodule.channels, datamodule.image_size):
        raise ValueError(
            f"teacher {path} was trained on {shape[0]}x{shape[1]}x{shape[1]} images but the data gives "
            f"{datamodule.channels}x{datamodule.image_size}x{datamodule.image_size}: use the teacher's data config"
        )
    if hp.get("text_encoder") and not getattr(datamodule, "captions", False):
        raise ValueError(
            f"teacher {path} is a text-to-image model: give it its captioned data (e.g. data=mnist5k_captions)"
        )
    asked = module.get("num_classes")
    if asked is not None and asked != hp.get("num_classes"):
        raise ValueError(
            f"module.num_classes={asked} but teacher {path} was trained with num_classes={hp.get('num_classes')}: "
            "a student has its teacher's conditions; drop module.num_classes"
        )
    if hp.get("prediction") == "eps":
        log.warning(
            "teacher %s predicts eps: a student that predicts eps degrades below ~4 steps (x0 = x - sigma eps "
            "magnifies its error by sigma_max; Salimans & Ho 2022, Sec. 4); train teachers with module.prediction=v",
            path,
        )
    return {
        **{k: hp.get(k) for k in TEACHER_KEYS},
        **({"sigma_data": hp["sigma_data"]} if "sigma_data" in hp else {}),  # edm's outputs depend on it
        "schedule": {k: hp[k] for k in SCHEDULE_KEYS if k in hp},
    }


def init_from_teacher(student: DiffusionModel, path: str) -> None:
    """The student starts from the teacher's EMA weights (its network, EMA, target and text encoder)."""
    from fewstep.lit import load_model

    teacher = load_model(path)
    weights = teacher.sampling_net().state_dict()
    student.net.load_state_dict(weights)
    for replica in (student.ema.module if student.ema is not None else None, getattr(student, "target_net", None)):
        if replica is not None:
            replica.load_state_dict(weights)
    if teacher.text_encoder is not None and student.text_encoder is not None:
        student.text_encoder.load_state_dict(teacher.text_encoder.state_dict())
        if student.ema_text is not None:
            student.ema_text.module.load_state_dict(teacher.text_encoder.state_dict())


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def resolve_trainer_precision(cfg: DictConfig, model: DiffusionModel, cache_dir: str | None = None) -> str:
    """Resolve ``trainer.precision=auto`` in ``cfg`` (see :mod:`fewstep.precision`); warn about a 16-bit
    precision asked on a CPU without native support. Returns the precision the Trainer will use."""
    requested = cfg.trainer.get("precision", "32")
    hp = model.hparams
    batch_size = min(int(cfg.data.get("batch_size") or 32), 32)
    network = {
        "net": hp.net,
        "shape": [hp.channels, hp.image_size, hp.image_size],
        "batch_size": batch_size,
        "num_classes": hp.num_classes,
        "text_encoder": hp.text_encoder,
        "prediction": hp.prediction,
    }

    accelerator = cfg.trainer.get("accelerator", "auto")
    device = "cuda" if device_kind(accelerator) == "cuda" else "cpu"

    def probe(dtype: torch.dtype) -> float:
        return probe_speedup(model, dtype, batch_size=batch_size, device=device)

    precision = resolve_precision(requested, accelerator, probe, cache_dir, network=network)
    if str(requested) == "auto":
        with open_dict(cfg.trainer):
            cfg.trainer.precision = precision
    return precision


def train(cfg: DictConfig) -> float | None:
    """Fit the model; return the best validation loss (for Hydra sweepers)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule: ImageDataModule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        # Refuse unsafe or mismatched checkpoints with one line before Lightning touches them.
        saved = load_checkpoint(ckpt_path)
        check_architecture(saved["hyper_parameters"], dict(model.hparams), path=str(ckpt_path))
        del saved
    resolve_trainer_precision(cfg, model)  # before the Trainer: it does not know "auto"
    callbacks = instantiate_all(cfg.get("callbacks"))
    loggers = instantiate_all(cfg.get("logger"))
    if not loggers:  # logger=none: nothing to report learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    checkpoint = trainer.checkpoint_callback
    if trainer.is_global_zero and checkpoint is not None:
        log.info("last checkpoint: %s", checkpoint.last_model_path or "-")
        log.info("best checkpoint: %s", checkpoint.best_model_path or "-")
    score = checkpoint.best_model_score if checkpoint is not None else None
    return float(score) if score is not None else None
