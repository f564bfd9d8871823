"""U-Net shapes for every size of conf/model, and its input checks."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import ROOT

from fewstep.nn import UNet

SIZES = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_every_size(size, channels):
    config = yaml.safe_load((ROOT / "conf" / "model" / f"{size}.yaml").read_text())
    net = UNet(image_size=32, in_channels=channels, **config).eval()
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        out = net(x, torch.tensor([3.0, 977.5]))
    assert out.shape == x.shape


def test_sizes_exist_and_grow():
    assert {"tiny", "small", "base"} <= set(SIZES)
    counts = []
    for size in ("tiny", "small", "base"):
        config = yaml.safe_load((ROOT / "conf" / "model" / f"{size}.yaml").read_text())
        counts.append(sum(p.numel() for p in UNet(image_size=32, in_channels=3, **config).parameters()))
    assert counts == sorted(counts) and 30e6 < counts[-1] < 40e6  # base ~ DDPM's 35.7M CIFAR-10 net


def test_image_size_must_divide():
    with pytest.raises(ValueError, match="image_size=30 is not divisible by 4"):
        UNet(image_size=30, channel_mult=(1, 2, 2))


def test_class_conditional_and_null_label():
    net = UNet(image_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2), num_classes=10).eval()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10.0, 20.0, 30.0])
    with torch.no_grad():
        a = net(x, t, y=torch.tensor([1, 2, 3]))
        b = net(x, t)  # no labels: the null token
        c = net(x, t, y=torch.full((3,), 10))
    assert a.shape == x.shape and torch.equal(b, c)
