"""Adherence: does a conditional sample show what its condition asked for?

- the digit: fewstep's classifier (the FID feature network of :mod:`fewstep.metrics.classifier`,
  trained on the same data) must put the sample in the requested class;
- stroke weight, slant and size: measured on the pixels with the very rules that made the training
  captions (:class:`fewstep.data.CaptionRules`), for the attributes a prompt names.

Streamed like the FID metrics: ``update`` per batch, ``compute`` at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fewstep.data import CaptionRules, parse_caption
from fewstep.data.captions import ATTRIBUTES, BINS
from fewstep.metrics.features import FeatureExtractor


class Adherence:
    """Counts of asked and matched conditions, per kind (``digit`` and the caption attributes).

    Args:
        classifier: a feature extractor whose logits are the dataset's classes (``features=classifier``).
        rules: the caption rules of the data, to check stroke weight / slant / size; None skips them.
    """

    def __init__(self, classifier: FeatureExtractor | None, rules: CaptionRules | None = None) -> None:
        self.classifier, self.rules = classifier, rules
        self.asked = dict.fromkeys(("digit", *ATTRIBUTES), 0)
        self.correct = dict.fromkeys(("digit", *ATTRIBUTES), 0)

    @torch.no_grad()
    def update(self, images: Tensor, labels: Tensor | None = None, prompts: Sequence[str] | None = None) -> None:
        """Score a batch of samples in [-1, 1] against their labels and/or prompts (one per image)."""
        asked = [parse_caption(p) for p in prompts] if prompts is not None else [{} for _ in images]
        if len(asked) != len(images):
            raise ValueError(f"got {len(images)} images but {len(asked)} prompts")
        wanted = labels.tolist() if labels is not None else [a.get("digit") for a in asked]
        rows = [i for i, w in enumerate(wanted) if w is not None]
        if rows and self.classifier is not None:
            _, logits = self.classifier(images[rows].to(self.classifier.device))
            predicted = logits.argmax(1).cpu().tolist()
            self.asked["digit"] += len(rows)
            self.correct["digit"] += sum(p == wanted[i] for p, i in zip(predicted, rows, strict=True))
        if self.rules is not None and prompts is not None:
            measured = self.rules.classify(images.float().cpu())
            for name in ATTRIBUTES:
                for i, a in enumerate(asked):
                    if a.get(name):
                        self.asked[name] += 1
                        self.correct[name] += int(measured[name][i]) == BINS[name].index(a[name])

    def compute(self) -> dict[str, float | int]:
        """``{kind: share matched}`` for every kind that was asked (NaN-free), plus ``{kind}_n`` counts."""
        out: dict[str, float | int] = {}
        for kind, n in self.asked.items():
            if n:
                out[kind] = self.correct[kind] / n
                out[f"{kind}_n"] = n
        return out
