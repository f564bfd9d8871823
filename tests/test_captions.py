"""Captioned MNIST-5k: deterministic captions from labels and measured attributes, rules, parsing."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from fewstep.data import (
    BINS,
    CaptionRules,
    attribute_adherence,
    caption_for,
    captioned_mnist5k,
    digit_attributes,
    make_captions,
    parse_caption,
)
from fewstep.data.captions import ATTRIBUTES, TEMPLATES
from fewstep.lit import ImageDataModule


@pytest.fixture(scope="module")
def captioned():
    return captioned_mnist5k(32)


def test_captions_are_deterministic_and_name_their_digit(captioned):
    images, labels = captioned.base.tensors
    rules = CaptionRules.fit(images.clone())
    assert rules == captioned.rules and make_captions(labels, rules.classify(images)) == captioned.captions
    labels = labels.tolist()
    assert all(parse_caption(c)["digit"] == d for c, d in zip(captioned.captions, labels, strict=True))
    assert len(set(captioned.captions)) > 200  # varied: templates x digits x attributes
    assert any("7" in c.split() for c in captioned.captions) and any("seven" in c for c in captioned.captions)


def test_attribute_bins_are_balanced(captioned):
    images = captioned.base.tensors[0]
    bins = captioned.rules.classify(images)
    for name in ATTRIBUTES:
        shares = torch.bincount(bins[name], minlength=3) / len(images)
        assert ((shares >= 0.20) & (shares <= 0.47)).all(), (name, shares.tolist())


def test_rules_agree_with_the_captions(captioned):
    images = captioned.base.tensors[0]
    bins = captioned.rules.classify(images)
    asked = 0
    for i, text in enumerate(captioned.captions):
        wanted = parse_caption(text)
        for name in ATTRIBUTES:
            if wanted[name] is not None:
                asked += 1
                assert BINS[name][int(bins[name][i])] == wanted[name], (i, text)
    assert asked > 5000  # most captions name one or more attributes
    score = attribute_adherence(images[:800], captioned.captions[:800], captioned.rules)
    assert all(score[name]["accuracy"] == 1.0 and score[name]["asked"] > 100 for name in ATTRIBUTES)


def test_parse_caption_round_trips_every_template():
    for template, digit, numeral in itertools.product(range(len(TEMPLATES)), range(10), (False, True)):
        for weight, slant, size in itertools.product(BINS["weight"], BINS["slant"], BINS["size"]):
            text = caption_for(digit, weight, slant, size, template, numeral)
            expected = {
                "digit": digit,
                "weight": weight if "{weight}" in TEMPLATES[template] else None,
                "slant": slant if "{slant" in TEMPLATES[template] else None,
                "size": size if "{size}" in TEMPLATES[template] else None,
            }
            assert parse_caption(text) == expected, text
    assert parse_caption("a photo of a cat") == {"digit": None, "weight": None, "slant": None, "size": None}
    assert parse_caption("A BIG, thick 3 leaning right!") == {
        "digit": 3,
        "weight": "bold",
        "slant": "right",
        "size": "large",
    }


def test_caption_wording():
    assert caption_for(7, "bold", "upright", "small", 0) == "a bold seven"
    assert caption_for(7, "bold", "right", "small", 1, numeral=True) == "the digit 7, slanted to the right"
    assert caption_for(7, "thin", "left", "small", 2, numeral=True) == "a small thin 7"
    assert caption_for(8, "regular", "upright", "large", 4) == "an upright regular eight"
    assert caption_for(8, "thin", "left", "medium", 5, numeral=True) == "a medium-sized 8"
    assert caption_for(8, "thin", "left", "large", 5, numeral=True) == "a large 8"
    assert caption_for(1, "thin", "left", "large", 7) == "a handwritten one"
    assert caption_for(8, "thin", "left", "large", 7, numeral=True) == "a handwritten 8"
    assert caption_for(8, "thin", "left", "large", 0, numeral=True) == "a thin 8"


def _line(top_col: float, bottom_col: float, width: int = 1, size: int = 32, rows: tuple = (6, 26)) -> torch.Tensor:
    """A [1, 1, size, size] image in [-1, 1] with a straight stroke from (rows[0], top_col) to (rows[1], bottom_col)."""
    image = -torch.ones(1, 1, size, size)
    for r in range(rows[0], rows[1]):
        c = round(top_col + (bottom_col - top_col) * (r - rows[0]) / (rows[1] - rows[0] - 1))
        image[0, 0, r, c : c + width] = 1.0
    return image


def test_attribute_directions():
    rules = CaptionRules(weight=(0.04, 0.08), size=(0.02, 0.2))
    right, left, upright = _line(20, 10), _line(10, 20), _line(15, 15)
    slant = digit_attributes(torch.cat([right, left, upright]))["slant"]
    assert slant[0] > 0.3 and slant[1] < -0.3 and abs(slant[2]) < 1e-9  # "right" = the top leans right
    assert rules.classify(torch.cat([left, upright, right]))["slant"].tolist() == [0, 1, 2]
    thin, bold = _line(15, 15, width=1), _line(13, 13, width=5)
    assert rules.classify(torch.cat([thin, bold]))["weight"].tolist() == [0, 2]
    boxes = -torch.ones(2, 1, 32, 32)
    boxes[0, 0, 14:18, 14:18] = 1
    boxes[1, 0, 4:28, 6:26] = 1
    sizes = digit_attributes(boxes)["size"]
    assert sizes[0] < 0.02 < 0.2 < sizes[1] and rules.classify(boxes)["size"].tolist() == [0, 2]
    stray = boxes[1:].clone()
    stray[0, 0, 0, 0] = 1  # one stray pixel barely moves the robust box
    assert abs(digit_attributes(stray)["size"] - sizes[1]) < 0.01


def test_empty_and_noisy_images_measure_finite():
    images = torch.cat([-torch.ones(1, 1, 32, 32), torch.rand(1, 1, 32, 32) * 2 - 1])
    values = digit_attributes(images)
    assert all(torch.isfinite(v).all() for v in values.values())
    assert values["weight"][0] == 0 and values["size"][0] == 0 and values["slant"][0] == 0


def test_rules_are_plain_data(captioned):
    stored = json.loads(json.dumps(captioned.rules.to_dict()))
    assert CaptionRules.from_dict(stored) == captioned.rules
    with pytest.raises(ValueError, match="increasing"):
        CaptionRules(weight=(0.2, 0.1), size=(0.1, 0.2))
    assert math.isnan(
        attribute_adherence(torch.zeros(1, 1, 8, 8), ["a handwritten 3"], captioned.rules)["size"]["accuracy"]
    )


def test_datamodule_with_captions():
    dm = ImageDataModule(captions=True, batch_size=8)
    dm.setup()
    x, y, captions = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 32, 32) and isinstance(captions, list | tuple) and len(captions) == 8
    assert all(isinstance(c, str) and parse_caption(c)["digit"] == d for c, d in zip(captions, y.tolist(), strict=True))
    train = dm.train_captions()
    assert len(train) == 4500 and train[0] == dm.train_set[0][2]
    assert dm.num_classes == 10 and isinstance(dm.caption_rules, CaptionRules)
    frequencies = dm.class_frequencies()
    assert frequencies.shape == (10,) and abs(frequencies.sum().item() - 1) < 1e-9 and (frequencies > 0.08).all()
    assert len(next(iter(dm.val_dataloader()))) == 3


def test_datamodule_caption_options():
    plain = ImageDataModule(batch_size=4)
    plain.setup()
    assert len(next(iter(plain.train_dataloader()))) == 2  # (image, label) as before
    with pytest.raises(ValueError, match="data.captions=true"):
        plain.train_captions()
    with pytest.raises(ValueError, match="has no captions"):
        ImageDataModule(name="cifar10", captions=True)
    with pytest.raises(ValueError, match="random_flip"):
        ImageDataModule(captions=True, random_flip=True)
    with pytest.raises(ValueError, match="choose one of"):
        ImageDataModule(name="imagenet", captions=True)
