"""The Diffusion Transformer: shapes, size of ``model=dit_tiny``, adaLN-Zero, class / text conditioning."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import ROOT

from fewstep.nn import DiT
from fewstep.nn.dit import sincos_pos_embed_2d

TEXT_DIM = 12


def dit_tiny_config() -> dict:
    """The ``model=dit_tiny`` network arguments when the config exists, else the DiT defaults (the same)."""
    for directory in (ROOT / "src" / "fewstep" / "conf" / "model", ROOT / "conf" / "model"):
        path = directory / "dit_tiny.yaml"
        if path.exists():
            config = yaml.safe_load(path.read_text()) or {}
            config = dict(config.get("net", config))
            config.pop("_target_", None)
            return {k: v for k, v in config.items() if not (isinstance(v, str) and "${" in v)}
    return {}


def small_dit(**kwargs) -> DiT:
    return DiT(image_size=16, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, **kwargs).eval()


def randomise(net: torch.nn.Module) -> torch.nn.Module:
    """Non-zero weights everywhere: adaLN-Zero and the zero output layer hide all conditioning."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("channels", [1, 3])
def test_dit_tiny_output_shape(channels):
    net = DiT(image_size=32, in_channels=channels, **dit_tiny_config()).eval()
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        out = net(x, torch.tensor([3.0, 977.5]))
    assert out.shape == x.shape


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("patch_size", [2, 4])
def test_output_shape(channels, patch_size):
    net = DiT(image_size=16, in_channels=channels, patch_size=patch_size, hidden_size=32, depth=1, num_heads=4)
    x = torch.randn(3, channels, 16, 16)
    assert randomise(net)(x, torch.tensor(7.5)).shape == x.shape  # a 0-d t is expanded


def test_dit_tiny_size():
    count = sum(p.numel() for p in DiT(image_size=32, in_channels=1, **dit_tiny_config()).parameters())
    assert 1e6 <= count <= 3e6


def test_image_size_must_divide():
    with pytest.raises(ValueError, match="image_size=30 is not divisible by patch_size=4"):
        DiT(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="hidden_size=30 must be divisible"):
        DiT(image_size=32, hidden_size=30, num_heads=3)


def test_starts_at_zero_adaln_zero():
    # adaLN-Zero (Sec. 3.2): every block starts as the identity and the output layer at zero.
    net = small_dit(num_classes=10, context_dim=TEXT_DIM)
    out = net(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 2.0]), y=torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))


def test_position_embedding_fixed_and_not_stored():
    net = small_dit()
    assert "pos_embed" not in net.state_dict() and not any("pos_embed" in n for n, _ in net.named_parameters())
    pos = sincos_pos_embed_2d(32, 8)
    assert pos.shape == (64, 32) and torch.equal(net.pos_embed[0], pos)
    assert len({tuple(row.tolist()) for row in pos}) == 64  # every patch position distinct


def test_unpatchify_puts_each_token_at_its_patch():
    net = DiT(image_size=8, in_channels=2, patch_size=2, hidden_size=16, depth=1, num_heads=2)
    tokens = torch.arange(16.0)[None, :, None].expand(1, 16, 2 * 2 * 2)  # token n filled with n
    image = net.unpatchify(tokens)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert image.shape == (1, 2, 8, 8) and torch.equal(image[0, 1], ((rows // 2) * 4 + cols // 2).float())
    # The patch embedding reads the same patches: a change inside patch (0, 1) moves only token 1.
    x = torch.zeros(1, 2, 8, 8)
    moved = x.clone()
    moved[0, 0, 1, 3] = 1.0
    diff = (net.x_embedder(moved) - net.x_embedder(x)).flatten(2).abs().sum(1)[0]
    assert diff.nonzero().flatten().tolist() == [1]


def test_class_conditional_and_null_label():
    net = randomise(small_dit(num_classes=10))
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10.0, 20.0, 30.0])
    with torch.no_grad():
        a = net(x, t, y=torch.tensor([1, 2, 3]))
        b = net(x, t)  # no labels: the null label
        c = net(x, t, y=torch.full((3,), 10))
        d = net(x, t, y=torch.tensor([4, 5, 6]))
    assert torch.equal(b, c) and not torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, d, atol=1e-4)
    assert net.y_embedder.num_embeddings == 11


def test_text_conditioning_and_mask():
    net = randomise(small_dit(context_dim=TEXT_DIM))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 500.0])
    context = torch.randn(2, 5, TEXT_DIM)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    other = context.clone()
    other[~mask] = torch.randn(int((~mask).sum()), TEXT_DIM) * 100  # change only the padding tokens
    with torch.no_grad():
        base = net(x, t, context=context, context_mask=mask)
        assert torch.allclose(base, net(x, t, context=other, context_mask=mask), atol=1e-5)
        assert not torch.allclose(base, net(x, t, context=torch.randn_like(context), context_mask=mask), atol=1e-4)
        assert not torch.allclose(base, net(x, t, context=context), atol=1e-4)  # the mask matters
        pooled = torch.randn(2, TEXT_DIM)
        assert not torch.allclose(base, net(x, t, context=context, context_mask=mask, pooled=pooled), atol=1e-4)


def test_no_text_is_safe_and_consistent():
    net = randomise(small_dit(context_dim=TEXT_DIM, num_classes=3)).train()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 900.0])
    context = torch.randn(2, 4, TEXT_DIM, requires_grad=True)
    masked = net(x, t, context=context, context_mask=torch.zeros(2, 4, dtype=torch.bool))
    masked.square().mean().backward()
    assert torch.isfinite(masked).all() and torch.isfinite(context.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    with torch.no_grad():
        none = net(x, t)
    # An all-padding row and no context at all both attend to the learned null token alone.
    assert torch.allclose(masked.detach(), none, atol=1e-5)


def test_text_inputs_refused_without_context_dim():
    net = small_dit(num_classes=10)
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([1.0])
    with pytest.raises(ValueError, match="DiT was built without context_dim"):
        net(x, t, context=torch.randn(1, 3, TEXT_DIM))
    with pytest.raises(ValueError, match="without context_dim"):
        net(x, t, pooled=torch.randn(1, TEXT_DIM))
    with pytest.raises(ValueError, match="built for 16x16"):
        net(torch.randn(1, 1, 32, 32), t)


def test_learns_a_fixed_batch():
    torch.manual_seed(0)
    net = DiT(
        image_size=8,
        in_channels=1,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=4,
        context_dim=TEXT_DIM,
    ).train()
    x, t = torch.randn(8, 1, 8, 8), torch.linspace(0, 999, 8)
    y, context = torch.randint(0, 4, (8,)), torch.randn(8, 3, TEXT_DIM)
    target = torch.randn(8, 1, 8, 8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):  # memorise a random target (0.89 -> ~0.06 in 30 steps)
        loss = (net(x, t, y=y, context=context) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # Every conditioning path received gradient (none is dead behind a zero initialisation).
    cross = net.blocks[0].cross
    assert net.y_embedder.weight.grad.abs().sum() > 0 and cross.kv.weight.grad.abs().sum() > 0
