"""The training side of a few-step student: the frozen teacher, the objective and its bookkeeping.

A :class:`Distiller` is what ``DiffusionModel(distillation=...)`` delegates to: the loss of a
training step, what happens after each optimizer step (the consistency target's EMA, progressive
rounds), the denoiser a student samples with, and the state a checkpoint must carry to resume.

``distillation`` config (``module.distillation``, set by ``experiment=distill_progressive`` /
``distill_consistency``):

- ``method``: ``progressive`` | ``consistency`` | ``consistency_training`` (no teacher);
- ``teacher``: the teacher checkpoint;
- ``guidance_scale``: distil the classifier-free-guided teacher (the student needs one pass);
- progressive: ``teacher_steps`` (DDIM steps of the teacher in round 1), ``rounds``, ``steps_per_round``;
- consistency: ``solver``, ``target_decay``, ``total_steps`` (the curriculum's K), ``s0``, ``s1``, ``groups``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.diffusion import Denoiser, Parameterisation
from fewstep.diffusion.schedules import Schedule
from fewstep.distill.objectives import ConsistencyDistillation, ConsistencyFunction, ProgressiveDistillation

log = logging.getLogger(__name__)
METHODS = ("progressive", "consistency", "consistency_training")
PROGRESSIVE = {"teacher_steps": 64, "rounds": 5, "steps_per_round": 500}
CONSISTENCY = {"solver": "heun", "target_decay": 0.95, "total_steps": 2000, "s0": 10, "s1": 1280, "groups": 4}


def check_distillation(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with its defaults, or a one-line error."""
    config = dict(config)
    method = config.get("method")
    if method not in METHODS:
        raise ValueError(f"unknown distillation.method {method!r}; choose one of: {', '.join(METHODS)}")
    if method in ("progressive", "consistency") and not config.get("teacher"):
        raise ValueError(f"{method} distillation needs a teacher: teacher=PATH (a fewstep checkpoint)")
    if method == "consistency_training" and config.get("teacher"):
        raise ValueError("consistency_training learns without a teacher: drop teacher= (or use method consistency)")
    defaults = PROGRESSIVE if method == "progressive" else CONSISTENCY
    unknown = set(config) - {"method", "teacher", "guidance_scale", *defaults}
    if unknown:
        raise ValueError(f"distillation has no option {', '.join(sorted(unknown))}; its options: {', '.join(defaults)}")
    config = {"teacher": None, "guidance_scale": 1.0, **defaults, **config}
    if method == "progressive":
        steps, rounds = config["teacher_steps"], config["rounds"]
        if not isinstance(steps, int) or steps < 2 or steps & (steps - 1):
            raise ValueError(f"distillation.teacher_steps must be a power of 2 >= 2, got {steps!r}")
        if not isinstance(rounds, int) or rounds < 1 or steps >> rounds < 1:
            limit = steps.bit_length() - 1
            raise ValueError(
                f"distillation.rounds={rounds} halves the teacher's {steps} steps below 1; use 1..{limit} rounds"
            )
    return config


class Distiller:
    """Holds the teacher outside the module tree (it is neither trained nor saved: it is reloaded
    from its checkpoint, or, after a progressive round, from the state this object saves)."""

    def __init__(self, config: Mapping[str, Any], schedule: Schedule, parameterisation: Parameterisation) -> None:
        self.config = check_distillation(config)
        self.method = self.config["method"]
        self.schedule, self.parameterisation = schedule, parameterisation
        self.teacher_net: nn.Module | None = None  # a later progressive round's teacher (the last student)
        self._teacher: Any = None  # the loaded teacher DiffusionModel (round 1)
        self._denoiser: tuple[Any, Any] | None = None  # ((round, device), the teacher's denoiser)
        self.round, self.steps_in_round = 0, 0
        if self.method == "progressive":
            self.objective: Any = ProgressiveDistillation(schedule, self.student_steps)
        else:
            self.objective = ConsistencyDistillation(
                schedule.sigma_min,
                schedule.sigma_max,
                int(self.config["total_steps"]),
                solver=self.config["solver"],
                s0=int(self.config["s0"]),
                s1=int(self.config["s1"]),
                groups=int(self.config["groups"]),
            )
            decay = self.config["target_decay"]
            if not 0 <= decay < 1:
                raise ValueError(f"distillation.target_decay must be in [0, 1), got {decay}")

    # ------------------------------------------------------------------------------ what it is
    @property
    def student_steps(self) -> int:
        """Progressive: the DDIM steps the current round's student is trained for."""
        return self.config["teacher_steps"] >> (self.round + 1)

    def sampler(self) -> dict[str, Any]:
        """The sampler config the current student samples with."""
        return self.student_sampler(self.config, self.round)

    @staticmethod
    def student_sampler(config: Mapping[str, Any], round_index: int = 0) -> dict[str, Any]:
        """DDIM at a progressive student's steps, or one consistency step."""
        if config["method"] == "progressive":
            steps = config["teacher_steps"] >> (round_index + 1)
            return {"name": "ddim", "steps": steps, "spacing": "trailing", "eta": 0.0}
        return {"name": "consistency", "steps": 1, "spacing": "karras", "levels": None}

    def wrap(self, denoiser: Denoiser) -> Any:
        """The denoiser a student samples with: a consistency student's is its consistency function."""
        if self.method != "progressive":
            return ConsistencyFunction(denoiser, self.schedule.sigma_min)
        return denoiser

    # ------------------------------------------------------------------------------ the teacher
    def teacher(self, module: Any) -> Any:
        """The teacher's denoiser (guided when ``guidance_scale != 1``), on the module's device; built
        once per round (it is asked for at every training step)."""
        if self.config["teacher"] is None:
            return None
        if self._denoiser is None or self._denoiser[0] != (self.round, module.device):
            self._denoiser = ((self.round, module.device), self._build_teacher(module))
        return self._denoiser[1]

    def _build_teacher(self, module: Any) -> Any:
        if self._teacher is None:
            from fewstep.lit.checkpoint import load_model

            # Building a model draws initial weights: keep that off the training RNG, so that a
            # resumed run (which loads the teacher later than the original) draws the same noise.
            devices = [module.device] if module.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                self._teacher = load_model(self.config["teacher"], map_location=module.device)
            self._teacher.requires_grad_(False)
        teacher = self._teacher.to(module.device).eval()
        # The teacher denoises as it samples best, with its x0 clipping: an unclipped eps-model leaves
        # speckle noise after a few DDIM steps, which a student would learn to reproduce.
        clip = teacher.hparams.clip_x0
        if self.teacher_net is not None:
            # a later round's teacher is the last student, which already learned the guided teacher:
            # guiding it again would compound the guidance (Meng et al. 2023 guide only the first stage)
            return Denoiser(self.teacher_net.to(module.device).eval(), teacher.parameterisation, clip_x0=clip)
        denoiser = Denoiser(teacher.sampling_net(), teacher.parameterisation, clip_x0=clip)
        return teacher.guidance(float(self.config["guidance_scale"])).wrap(denoiser)

    # ------------------------------------------------------------------------------ training
    def loss(
        self, module: Any, x0: Tensor, cond: Mapping, generator: torch.Generator | None = None, training: bool = True
    ) -> Tensor:
        """The objective on a batch; ``training=False`` (validation) never starts a new round."""
        if training and self.method == "progressive" and self.steps_in_round >= self.config["steps_per_round"]:
            self.next_round(module)

        def student(x: Tensor, sigma: Tensor, **c: Any) -> Tensor:
            return self.parameterisation.denoise(module.net, x, sigma, **c)

        if self.method == "progressive":
            return self.objective.loss(student, self.teacher(module), x0, cond, generator)

        def target(x: Tensor, sigma: Tensor, **c: Any) -> Tensor:
            return self.parameterisation.denoise(module.target_net, x, sigma, **c)

        f, f_target = self.wrap(student), self.wrap(target)
        step = module.global_step
        return self.objective.loss(f, f_target, self.teacher(module), x0, step, cond, generator)

    @torch.no_grad()
    def after_step(self, module: Any) -> None:
        """After each optimizer step: the consistency target's EMA, or the progressive round count."""
        if self.method != "progressive":
            decay = float(self.config["target_decay"])
            torch._foreach_lerp_(list(module.target_net.parameters()), list(module.net.parameters()), 1 - decay)
            return
        self.steps_in_round += 1
        last_round_done = (
            self.round + 1 >= self.config["rounds"] and self.steps_in_round >= self.config["steps_per_round"]
        )
        if last_round_done and module._trainer is not None:
            module.trainer.should_stop = True

    def next_round(self, module: Any) -> None:
        """Progressive: the student just trained becomes the teacher; the new student (the same
        weights) learns half the steps. Called at the first step of the new round, so that a
        checkpoint saved at a round's end holds that round's student."""
        self.teacher_net = copy.deepcopy(module.sampling_net()).requires_grad_(False)
        self.round, self.steps_in_round = self.round + 1, 0
        self.objective = ProgressiveDistillation(self.schedule, self.student_steps)
        module.hparams.sampler = self.sampler()
        if module.ema is not None:
            module.ema.restart()  # the EMA restarts from the current weights (its warm-up)
        log.info("progressive distillation: round %d, student of %d steps", self.round + 1, self.student_steps)

    # ------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"round": self.round, "steps_in_round": self.steps_in_round}
        if self.teacher_net is not None:
            state["teacher_net"] = self.teacher_net.state_dict()
        return state

    def load_state(self, state: Mapping[str, Any], module: Any) -> None:
        self.round, self.steps_in_round = int(state["round"]), int(state["steps_in_round"])
        if self.method == "progressive":
            self.objective = ProgressiveDistillation(self.schedule, self.student_steps)
        self._denoiser = None
        if "teacher_net" in state:
            self.teacher_net = copy.deepcopy(module.net).requires_grad_(False)
            self.teacher_net.load_state_dict(state["teacher_net"])
        module.hparams.sampler = self.sampler()
