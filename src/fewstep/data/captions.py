"""Captions for MNIST digits, made from the label and attributes measured on the pixels.

Three attributes, each binned into three classes by :class:`CaptionRules`:

* ``weight`` (stroke weight): the ink fraction, the share of pixels > 0 in the [-1, 1] image
  (``thin`` / ``regular`` / ``bold``: terciles over the data the rules are fitted on);
* ``slant``: the shear of the ink distribution, ``-mu11 / mu02`` with image rows pointing down,
  i.e. how many columns the ink moves right per row upwards. Positive = the top leans right
  (``left`` / ``upright`` / ``right``: fixed thresholds, see :data:`SLANT_THRESHOLDS`);
* ``size``: the area of the ink's robust bounding box (the extent holding all but 1 % of the ink
  on each side, with sub-pixel interpolation, so stray pixels barely move it and values do not tie)
  as a fraction of the image area (``small`` / ``medium`` / ``large``: terciles).

All three are fractions or ratios, so rules fitted at one resolution roughly hold at another.
Ink is the positive part of the image (``x.clamp(min=0)``): a faint background (< 0) counts for
nothing, which keeps the measures meaningful on generated samples.

The same rules score generated images: :func:`parse_caption` reads which attributes a prompt asks
for and :func:`attribute_adherence` checks them with :meth:`CaptionRules.classify`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

ATTRIBUTES = ("weight", "slant", "size")
BINS: dict[str, tuple[str, str, str]] = {
    "weight": ("thin", "regular", "bold"),
    "slant": ("left", "upright", "right"),
    "size": ("small", "medium", "large"),
}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Shear thresholds: < -0.05 leans left (top at least ~3 degrees left), > 0.20 leans right (~11 degrees).
# MNIST digits lean right on average (mean shear 0.14), so terciles would call slightly right-leaning
# digits "left"; these fixed values keep each class true to its name and common (26 / 33 / 41 % of MNIST-5k).
SLANT_THRESHOLDS = (-0.05, 0.20)
BOX_TRIM = 0.01  # share of the ink left outside the robust bounding box on each side

# Words of each bin as captions write them; parse_caption also accepts the synonyms.
SIZE_WORDS = {"small": "small", "medium": "medium-sized", "large": "large"}
SLANT_ADJECTIVES = {"left": "left-slanted", "upright": "upright", "right": "right-slanted"}
SLANT_PHRASES = {"left": "slanted to the left", "upright": "standing upright", "right": "slanted to the right"}
SYNONYMS = {
    "weight": {"thin": "thin", "regular": "regular", "bold": "bold", "thick": "bold"},
    "slant": {"left": "left", "right": "right", "upright": "upright", "straight": "upright"},
    "size": {"small": "small", "little": "small", "medium": "medium", "large": "large", "big": "large"},
}

# Caption templates; image i uses TEMPLATES[i % 8], with the digit as a numeral when (i // 8) is odd.
# "{a}" becomes "a" or "an" to fit the next word.
TEMPLATES = (
    "{a} {weight} {digit}",  # a bold seven
    "the digit {digit}, {slant_phrase}",  # the digit 7, slanted to the right
    "{a} {size} {weight} {digit}",  # a small thin 7
    "{a} {weight} {digit} {slant_phrase}",  # a thin 3 slanted to the left
    "{a} {slant_adj} {weight} {digit}",  # an upright regular eight
    "{a} {size} {digit}",  # a large nine
    "{a} {size} {digit} {slant_phrase}, with {weight} strokes",  # a medium-sized 4 standing upright, with bold strokes
    "a handwritten {digit}",  # the digit alone
)
_ARTICLE = "\x00"


def words(text: str) -> list[str]:
    """Lower-case words, split on anything that is not a letter or a digit (numerals are words)."""
    return re.findall(r"[^\W_]+", text.lower())


# ------------------------------------------------------------------------------------- measuring
def _robust_extent(profile: Tensor, trim: float = BOX_TRIM) -> Tensor:
    """Length of the interval holding all but ``trim`` of a non-negative ``[B, N]`` profile on each side.

    Pixel i covers [i, i + 1); the cumulative mass is interpolated linearly inside it.
    """
    total = profile.sum(-1, keepdim=True)
    cdf = (profile.cumsum(-1) / total.clamp_min(1e-12)).contiguous()

    def position(q: float) -> Tensor:
        target = torch.full_like(total, q)
        i = torch.searchsorted(cdf, target).clamp(max=profile.shape[-1] - 1)
        before = torch.where(i > 0, cdf.gather(-1, (i - 1).clamp_min(0)), torch.zeros_like(target))
        step = (cdf.gather(-1, i) - before).clamp_min(1e-12)
        return (i + ((target - before) / step).clamp(0, 1)).squeeze(-1)

    extent = position(1 - trim) - position(trim)
    return torch.where(total.squeeze(-1) > 0, extent, torch.zeros_like(extent))


def digit_attributes(images: Tensor) -> dict[str, Tensor]:
    """Measure stroke weight, slant and size of ``[B, 1, H, W]`` images in [-1, 1] (float64 ``[B]`` each).

    * ``weight``: ink fraction, the share of pixels > 0;
    * ``slant``: shear ``-mu11 / mu02`` of the ink density (central second moments, rows pointing
      down), the horizontal shift per row upwards: > 0 when the top leans right, 0 for an empty image;
    * ``size``: area of the robust bounding box (all but 1 % of the ink on each side) / image area.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"digit_attributes expects [B, 1, H, W] images, got shape {tuple(images.shape)}")
    x = images[:, 0].detach().double()
    ink = x.clamp(min=0)  # ink density: mid-grey and darker count for nothing
    _, height, width = x.shape
    row_mass, col_mass = ink.sum(2), ink.sum(1)  # [B, H], [B, W] profiles
    safe = row_mass.sum(1).clamp_min(1e-12)
    rows = torch.arange(height, dtype=x.dtype, device=x.device)
    cols = torch.arange(width, dtype=x.dtype, device=x.device)
    mean_r, mean_c = row_mass @ rows / safe, col_mass @ cols / safe
    mu02 = row_mass @ rows.square() / safe - mean_r.square()
    mu11 = torch.einsum("bhw,h,w->b", ink, rows, cols) / safe - mean_r * mean_c
    slant = torch.where(mu02 > 1e-9, -mu11 / mu02.clamp_min(1e-9), torch.zeros_like(mu11))
    box = _robust_extent(row_mass) * _robust_extent(col_mass)
    return {"weight": (x > 0).double().mean((1, 2)), "slant": slant, "size": box / (height * width)}


# --------------------------------------------------------------------------------------- binning
@dataclass(frozen=True)
class CaptionRules:
    """Two thresholds per attribute: bin 0 below the first, 1 up to the second, 2 from the second on.

    Plain floats throughout (:meth:`to_dict` / :meth:`from_dict`) so they fit in checkpoint
    hyper-parameters; the same rules caption the training digits and score generated ones.
    """

    weight: tuple[float, float]
    size: tuple[float, float]
    slant: tuple[float, float] = SLANT_THRESHOLDS

    def __post_init__(self) -> None:
        for name in ATTRIBUTES:
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"CaptionRules.{name} thresholds must be increasing, got {(low, high)}")
            object.__setattr__(self, name, (float(low), float(high)))

    @classmethod
    def fit(cls, images: Tensor, slant: Sequence[float] = SLANT_THRESHOLDS) -> CaptionRules:
        """Weight and size terciles of ``images`` ([B, 1, H, W] in [-1, 1]); slant thresholds as given."""
        values = digit_attributes(images)
        q = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)

        def terciles(name: str) -> tuple[float, float]:
            low, high = torch.quantile(values[name].cpu(), q).tolist()
            return low, high

        return cls(weight=terciles("weight"), size=terciles("size"), slant=(float(slant[0]), float(slant[1])))

    def bin(self, attributes: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Bin indices (LongTensor ``[B]``, 0-2, names in :data:`BINS`) of measured attributes."""
        out = {}
        for name in ATTRIBUTES:
            value = attributes[name].double()
            edges = torch.tensor(getattr(self, name), dtype=torch.float64, device=value.device)
            out[name] = torch.bucketize(value, edges, right=True)
        return out

    def classify(self, images: Tensor) -> dict[str, Tensor]:
        """Bin indices of ``[B, 1, H, W]`` images in [-1, 1]: ``{"weight", "slant", "size"} -> LongTensor[B]``."""
        return self.bin(digit_attributes(images))

    def to_dict(self) -> dict[str, list[float]]:
        return {name: list(getattr(self, name)) for name in ATTRIBUTES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> CaptionRules:
        return cls(**{name: tuple(data[name]) for name in ATTRIBUTES})


# -------------------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    """'an' before a vowel sound (an eight, an 8, an upright), 'a' otherwise (a one)."""
    return "an" if word in ("8", "eight") or (word[0] in "aeiou" and word != "one") else "a"


def caption_for(digit: int, weight: str, slant: str, size: str, template: int = 0, numeral: bool = False) -> str:
    """The caption of one digit from its bin names (see :data:`BINS`) and a template index (mod 8)."""
    text = TEMPLATES[template % len(TEMPLATES)].format(
        a=_ARTICLE,
        digit=str(digit) if numeral else DIGIT_WORDS[digit],
        weight=weight,
        size=SIZE_WORDS[size],
        slant_adj=SLANT_ADJECTIVES[slant],
        slant_phrase=SLANT_PHRASES[slant],
    )
    return re.sub(_ARTICLE + r" (\S+)", lambda m: f"{_article(m.group(1))} {m.group(1)}", text)


def make_captions(labels: Tensor | Sequence[int], bins: Mapping[str, Tensor]) -> list[str]:
    """Captions of a whole data set: item i gets template ``i % 8``, a numeral when ``(i // 8)`` is odd.

    ``bins`` are :meth:`CaptionRules.classify`'s indices for the same items, in the same order.
    """
    labels = [int(v) for v in labels]
    names = {name: [BINS[name][int(i)] for i in bins[name]] for name in ATTRIBUTES}
    n = len(TEMPLATES)
    return [
        caption_for(digit, names["weight"][i], names["slant"][i], names["size"][i], i % n, (i // n) % 2 == 1)
        for i, digit in enumerate(labels)
    ]


def parse_caption(text: str) -> dict[str, Any]:
    """Which digit and attributes a caption or prompt asks for.

    Returns ``{"digit": int | None, "weight": str | None, "slant": str | None, "size": str | None}``
    with bin names of :data:`BINS`; None where the text does not say. The first mention wins.
    """
    found: dict[str, Any] = {"digit": None, "weight": None, "slant": None, "size": None}
    for word in words(text):
        if found["digit"] is None and (word in DIGIT_WORDS or (len(word) == 1 and word.isdigit())):
            found["digit"] = DIGIT_WORDS.index(word) if word in DIGIT_WORDS else int(word)
            continue
        for name, table in SYNONYMS.items():
            if found[name] is None and word in table:
                found[name] = table[word]
    return found


def attribute_adherence(images: Tensor, prompts: Sequence[str], rules: CaptionRules) -> dict[str, dict[str, float]]:
    """How often images show the attributes their prompts ask for, measured with ``rules``.

    Returns ``{attribute: {"asked": n, "correct": k, "accuracy": k / n}}`` (accuracy NaN when no
    prompt asks for the attribute). The digit itself needs a classifier and is not checked here.
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    measured = rules.classify(images)
    asked = [parse_caption(p) for p in prompts]
    out = {}
    for name in ATTRIBUTES:
        pairs = [(BINS[name].index(a[name]), int(measured[name][i])) for i, a in enumerate(asked) if a[name]]
        correct = sum(want == got for want, got in pairs)
        out[name] = {
            "asked": len(pairs),
            "correct": correct,
            "accuracy": correct / len(pairs) if pairs else math.nan,
        }
    return out
