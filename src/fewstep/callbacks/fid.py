"""FID while training: every N steps, sample with the EMA weights and score against cached real statistics.

Off by default (``python train.py`` stays fast). Turn it on with, e.g.::

    python train.py callbacks.fid.every_n_steps=500 callbacks.fid.num_samples=2000
    python train.py callbacks.fid.at_end=true features=inception features.weights_path=/path/to/weights.pth

Under DDP each rank draws ``num_samples / world_size`` images with its own seed and the metric
states are synced by torchmetrics; every rank runs the evaluation (it holds collectives), rank 0
writes ``fid.jsonl``. Sampling calls the networks directly, never the DDP wrapper.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fewstep.diffusion.sampling import resolve_batch_size
from fewstep.lit.module import DiffusionModel
from fewstep.metrics import GenerativeScores, build_features, reference_stats

log = logging.getLogger(__name__)


class FID(L.Callback):
    """Logs ``eval/fid`` (and optionally ``eval/kid``, ``eval/is``) with the NFE and the sampling time.

    Args:
        every_n_steps: evaluate every this many optimizer steps (0: never during training).
        at_end: evaluate once more when training ends (unless the last step was just evaluated).
        num_samples: generated images per evaluation, over all ranks.
        batch_size: images sampled and scored at a time (per rank); no more are held. ``auto``: 64 on
            a CPU (faster per image there), 256 on a GPU.
        sampler: a sampler config (``conf/sampler``); ``None``: the model's own (``sampler=`` of the run).
        guidance: a ``conf/guidance`` config for conditional models; ``None``: the model's own.
        seed: the same noise every evaluation, so successive scores compare the weights, not the draws.
        features: the ``features`` config (``conf/features``: auto, classifier, inception).
        cache_dir: where the classifier and the reference statistics are cached (``paths.cache_dir``).
        reference_split: real images to compare with: ``train`` (standard), ``val`` or ``test``.
        kid, inception_score: also compute KID (Binkowski et al. 2018) / IS (Salimans et al. 2016).
        max_kid_features: real features cached for KID.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        at_end: bool = False,
        num_samples: int = 1000,
        batch_size: int | str = "auto",
        sampler: Mapping[str, Any] | None = None,
        guidance: Mapping[str, Any] | None = None,
        seed: int = 0,
        features: Mapping[str, Any] | None = None,
        cache_dir: str = "logs/cache",
        reference_split: str = "train",
        kid: bool = False,
        inception_score: bool = True,
        max_kid_features: int = 10_000,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"callbacks.fid.every_n_steps must be >= 0, got {every_n_steps}")
        if num_samples < 2:
            raise ValueError(f"callbacks.fid needs num_samples >= 2, got {num_samples}")
        try:
            resolve_batch_size(batch_size, "cpu")
        except ValueError as error:
            raise ValueError(f"callbacks.fid.{error}") from None
        self.every_n_steps, self.at_end = every_n_steps, at_end
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.sampler = dict(sampler) if sampler else None
        self.guidance = dict(guidance) if guidance else None
        self.features = dict(features or {"name": "auto"})
        self.cache_dir, self.reference_split = cache_dir, reference_split
        self.metrics = ("fid",) + (("kid",) if kid else ()) + (("is",) if inception_score else ())
        self.max_kid_features = max_kid_features
        self.scores: GenerativeScores | None = None
        self._last_step = -1

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0 or self.at_end

    # ----------------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: DiffusionModel, stage: str) -> None:
        if stage != "fit" or not self.enabled or self.scores is not None:
            return
        if self.num_samples < trainer.world_size:
            raise ValueError(
                f"callbacks.fid.num_samples={self.num_samples} is fewer than the {trainer.world_size} ranks"
            )
        data = pl_module.hparams.get("data")
        if not data:
            raise ValueError(
                "callbacks.fid needs the model's data config (DiffusionModel(data=...)); train via train.py"
            )
        # Rank 0 trains the classifier / computes the reference first; the others then read the cache
        # (or compute it themselves where they do not share rank 0's disk). Rank 0's outcome is broadcast,
        # not a bare barrier, so that its error stops every rank instead of leaving them waiting.
        # The module is not on its device yet when setup runs: the strategy says where it will be.
        device = trainer.strategy.root_device
        failure: Exception | None = None
        if trainer.is_global_zero:
            try:
                self.scores = self._build(data, device)
            except Exception as err:  # re-raised below, once the other ranks know
                failure = err
        message = trainer.strategy.broadcast((type(failure).__name__, str(failure)) if failure else None, src=0)
        if failure is not None:
            raise failure
        if message is not None:  # the same kind of error (one line for user errors), on the other ranks too
            kind = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(message[0], RuntimeError)
            raise kind(f"(on rank 0) {message[1]}")
        if not trainer.is_global_zero:
            self.scores = self._build(data, device)
        for logger in trainer.loggers:
            logger.log_hyperparams({"eval_features": self.scores.features})

    def _build(self, data: Mapping[str, Any], device: torch.device) -> GenerativeScores:
        features = {**self.features, "cache_dir": self.features.get("cache_dir") or self.cache_dir}
        extractor = build_features(features, data, device)
        reference = reference_stats(
            data,
            extractor,
            split=self.reference_split,
            cache_dir=self.cache_dir,
            max_kid_features=self.max_kid_features if "kid" in self.metrics else 0,
        )
        return GenerativeScores(extractor, reference, metrics=self.metrics, seed=self.seed)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DiffusionModel, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: DiffusionModel) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------------------ evaluation
    def conditions(self, trainer: L.Trainer, pl_module: DiffusionModel) -> dict[str, Any]:
        """One condition per sample, as the data has them: labels drawn with the training set's class
        frequencies, prompts drawn from its captions (the same on every rank, from ``seed``)."""
        generator = torch.Generator().manual_seed(self.seed)
        condition: dict[str, Any] = {}
        if pl_module.hparams.num_classes:
            frequencies = trainer.datamodule.class_frequencies().double()
            condition["y"] = torch.multinomial(frequencies, self.num_samples, replacement=True, generator=generator)
        if "text" in pl_module.conditions:
            captions = trainer.datamodule.train_captions()
            picks = torch.randint(len(captions), (self.num_samples,), generator=generator).tolist()
            condition["prompt"] = [captions[i] for i in picks]
        return condition

    def evaluate(self, trainer: L.Trainer, pl_module: DiffusionModel) -> dict[str, Any]:
        """Sample this rank's share batch by batch, score it, sync; log on every logger (rank 0 writes)."""
        self._last_step = trainer.global_step
        if self.scores is None:
            self.setup(trainer, pl_module, "fit")
        scores = self.scores
        scores.reset()
        rank, world = trainer.global_rank, trainer.world_size
        # Contiguous shares of the sample indices: sample i is the same image whatever the rank count.
        first = rank * (self.num_samples // world) + min(rank, self.num_samples % world)
        local = self.num_samples // world + int(rank < self.num_samples % world)
        condition = self.conditions(trainer, pl_module)
        start, seconds, nfe = time.perf_counter(), 0.0, 0.0
        batch_size = resolve_batch_size(self.batch_size, pl_module.device)
        for begin in range(0, local, batch_size):
            n = min(batch_size, local - begin)
            rows = slice(first + begin, first + begin + n)
            result = pl_module.sample(
                n,
                self.sampler,
                seed=self.seed,
                first_index=first + begin,
                batch_size=n,
                guidance=self.guidance,
                return_result=True,
                **{k: v[rows] for k, v in condition.items()},
            )
            seconds, nfe = seconds + result.seconds, max(nfe, result.nfe)
            scores.update(result.images)
        values = scores.compute()  # collectives: every rank gets here
        spec = self.sampler or pl_module.hparams.sampler
        figures = {
            "eval/fid": values["fid"],
            "eval/nfe": float(nfe),
            "eval/seconds_per_image": seconds / max(local, 1),
            "eval/seconds": time.perf_counter() - start,
        }
        if "kid_mean" in values:
            figures["eval/kid"] = values["kid_mean"]
        if "is_mean" in values:
            figures["eval/is"] = values["is_mean"]
        for logger in trainer.loggers:  # Lightning's loggers write on rank 0 only
            logger.log_metrics(figures, step=trainer.global_step)
        record = {
            "step": trainer.global_step,
            "sampler": spec.get("name"),
            "steps": spec.get("steps"),
            "nfe": nfe,
            "n": values.get("n", self.num_samples),
            "features": values["features"],
            **{k: v for k, v in values.items() if k not in ("features", "n")},
            "seconds_per_image": figures["eval/seconds_per_image"],
            "seconds": figures["eval/seconds"],
        }
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / "fid.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.info(
                "step %d: FID %.3f (%s, %d samples, NFE %d)",
                record["step"],
                record["fid"],
                record["features"],
                record["n"],
                nfe,
            )
        return record
