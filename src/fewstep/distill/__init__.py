"""Few-step students: progressive and consistency distillation (see :mod:`fewstep.distill.objectives`)."""

from fewstep.distill.objectives import ConsistencyDistillation, ConsistencyFunction, ProgressiveDistillation

__all__ = ["ConsistencyDistillation", "ConsistencyFunction", "ProgressiveDistillation"]
