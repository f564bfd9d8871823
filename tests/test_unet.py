"""U-Net shapes for every size of conf/model, its input checks, and its class / text conditioning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from fewstep.nn import UNet
from fewstep.nn.unet import AttentionBlock

# The model group lives in conf/model or, packaged, in src/fewstep/conf/model.
MODEL_DIR = next(d for d in (ROOT / "src" / "fewstep" / "conf" / "model", ROOT / "conf" / "model") if d.is_dir())


def net_config(path: Path) -> tuple[str, dict]:
    """(target, keyword arguments) of a model config, flat or nested under ``net:`` with a ``_target_``."""
    config = yaml.safe_load(path.read_text()) or {}
    config = dict(config.get("net", config))
    target = config.pop("_target_", "fewstep.nn.UNet")
    # Interpolations (``${data...}``) are the DiffusionModel's arguments, which the tests pass themselves.
    return target, {k: v for k, v in config.items() if not (isinstance(v, str) and "${" in v)}


UNET_CONFIGS = {p.stem: net_config(p)[1] for p in sorted(MODEL_DIR.glob("*.yaml")) if net_config(p)[0].endswith("UNet")}
SIZES = sorted(UNET_CONFIGS)
TEXT_DIM = 12


def small_unet(**kwargs) -> UNet:
    return UNet(image_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2), **kwargs).eval()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_every_size(size, channels):
    net = UNet(image_size=32, in_channels=channels, **UNET_CONFIGS[size]).eval()
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        out = net(x, torch.tensor([3.0, 977.5]))
    assert out.shape == x.shape


def test_sizes_exist_and_grow():
    assert {"tiny", "small", "base"} <= set(SIZES)
    counts = []
    for size in ("tiny", "small", "base"):
        counts.append(sum(p.numel() for p in UNet(image_size=32, in_channels=3, **UNET_CONFIGS[size]).parameters()))
    assert counts == sorted(counts) and 30e6 < counts[-1] < 40e6  # base ~ DDPM's 35.7M CIFAR-10 net


def test_tiny_fast_has_tiny_s_parameters():
    # model=tiny_fast is offered as tiny's size in a cheaper layout (benchmarks/train_efficiency.py)
    count = {
        size: sum(p.numel() for p in UNet(image_size=32, **UNET_CONFIGS[size]).parameters())
        for size in ("tiny", "tiny_fast")
    }
    assert abs(count["tiny_fast"] / count["tiny"] - 1) < 0.03


def test_image_size_must_divide():
    with pytest.raises(ValueError, match="image_size=30 is not divisible by 4"):
        UNet(image_size=30, channel_mult=(1, 2, 2))


def test_class_conditional_and_null_label():
    net = small_unet(num_classes=10)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10.0, 20.0, 30.0])
    with torch.no_grad():
        a = net(x, t, y=torch.tensor([1, 2, 3]))
        b = net(x, t)  # no labels: the null token
        c = net(x, t, y=torch.full((3,), 10))
    assert a.shape == x.shape and torch.equal(b, c)


def randomise(net: torch.nn.Module) -> torch.nn.Module:
    """Non-zero weights everywhere: the zero-initialised output projections hide conditioning."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_label_changes_output():
    net = randomise(small_unet(num_classes=10))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        a, b = net(x, t, y=torch.tensor([1, 1])), net(x, t, y=torch.tensor([7, 7]))
    assert not torch.allclose(a, b, atol=1e-5)


def test_unconditional_state_dict_has_no_text_modules():
    # Existing checkpoints: without context_dim the network is the one they were saved from.
    for size in ("tiny", "base"):
        keys = UNet(image_size=32, in_channels=3, num_classes=10, **UNET_CONFIGS[size]).state_dict().keys()
        assert not [k for k in keys if "cross" in k or "pooled" in k]
    plain = small_unet(attention_resolutions=(8,))
    text = small_unet(attention_resolutions=(8,), context_dim=TEXT_DIM)
    new = set(text.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) < set(text.state_dict())  # nothing renamed, only added
    assert all(".cross." in k or ".cross_norm." in k or k.startswith("pooled_proj.") for k in new)
    # Cross-attention at every attention block: the attention resolutions (down and up) and the middle.
    attention = {name for name, m in plain.named_modules() if isinstance(m, AttentionBlock)}
    assert {k.split(".cross.")[0] for k in new if k.endswith(".cross.null_kv")} == attention
    assert attention >= {"down.2.attn", "mid.1", "up.0.attn", "up.1.attn"}


def test_initialisation_unchanged_without_context_dim():
    config = dict(image_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2))
    torch.manual_seed(3)
    a = UNet(**config).state_dict()
    torch.manual_seed(3)
    b = UNet(**config, context_dim=None).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_text_conditioning_and_mask():
    net = randomise(small_unet(context_dim=TEXT_DIM))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 500.0])
    context = torch.randn(2, 5, TEXT_DIM)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    other = context.clone()
    other[~mask] = torch.randn(int((~mask).sum()), TEXT_DIM) * 100  # change only the padding tokens
    pooled = torch.randn(2, TEXT_DIM)
    with torch.no_grad():
        base = net(x, t, context=context, context_mask=mask)
        assert torch.allclose(base, net(x, t, context=other, context_mask=mask), atol=1e-5)
        assert not torch.allclose(base, net(x, t, context=torch.randn_like(context), context_mask=mask), atol=1e-4)
        assert not torch.allclose(base, net(x, t, context=context), atol=1e-4)  # the mask matters
        assert not torch.allclose(base, net(x, t, context=context, context_mask=mask, pooled=pooled), atol=1e-4)


def test_no_text_is_safe_and_consistent():
    net = randomise(small_unet(context_dim=TEXT_DIM, num_classes=3))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor(250.0)  # a 0-d t is expanded
    context = torch.randn(2, 4, TEXT_DIM)
    with torch.no_grad():
        masked = net(x, t, context=context, context_mask=torch.zeros(2, 4, dtype=torch.bool))
        none = net(x, t)
    assert torch.isfinite(masked).all() and torch.isfinite(none).all()
    # An all-padding row and no context at all both attend to the learned null token alone.
    assert torch.allclose(masked, none, atol=1e-5)


def test_all_masked_row_has_finite_gradients():
    net = small_unet(context_dim=TEXT_DIM).train()
    context = torch.randn(2, 3, TEXT_DIM, requires_grad=True)
    mask = torch.tensor([[False, False, False], [True, True, False]])
    out = net(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 2.0]), context=context, context_mask=mask)
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert torch.isfinite(context.grad).all()


def test_text_inputs_refused_without_context_dim():
    net = small_unet()
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([1.0])
    with pytest.raises(ValueError, match="without context_dim"):
        net(x, t, context=torch.randn(1, 3, TEXT_DIM))
    with pytest.raises(ValueError, match="without context_dim"):
        net(x, t, pooled=torch.randn(1, TEXT_DIM))


def test_text_input_shapes_checked():
    net = small_unet(context_dim=TEXT_DIM)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="context must be"):
        net(x, t, context=torch.randn(2, 3, TEXT_DIM + 1))
    with pytest.raises(ValueError, match="context_mask must be a bool"):
        net(x, t, context=torch.randn(2, 3, TEXT_DIM), context_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="without context"):
        net(x, t, context_mask=torch.ones(2, 3, dtype=torch.bool))
