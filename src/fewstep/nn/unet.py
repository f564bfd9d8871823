"""The U-Net denoising network (Ho et al. 2020, Appendix B; Dhariwal & Nichol 2021, Sec. 3).

It knows nothing of schedules or samplers: ``net(x, t, y=None)`` maps an image and a (possibly
fractional) timestep to an output of the image's shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps (Vaswani et al. 2017, Sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in DDPM where the width allows; narrow tiny models keep >= 4 channels a group.
    return nn.GroupNorm(min(32, max(1, channels // 4)), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding added in between, with a residual connection."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions, residual."""

    def __init__(self, channels: int, head_channels: int = 32) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """U-Net with a noise-level embedding, residual blocks, attention and optional class labels.

    Args:
        image_size: side of the (square) input; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels: image channels (1 for MNIST, 3 for RGB); the output has the same number.
        base_channels: width of the first level; level ``i`` has ``base_channels * channel_mult[i]``.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: spatial sizes (e.g. ``[16, 8]``) at which self-attention is used.
        num_classes: if set, ``forward`` takes labels ``y``; label ``num_classes`` means "no label"
            (the null token of classifier-free guidance).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (8,),
        dropout: float = 0.1,
        head_channels: int = 32,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        factor = 2 ** (levels - 1)
        if image_size % factor:
            valid = ", ".join(str(factor * k) for k in range(1, 5))
            raise ValueError(
                f"image_size={image_size} is not divisible by {factor} (2^(levels-1) for channel_mult="
                f"{list(channel_mult)}); use an image_size such as {valid}, or fewer levels in model.channel_mult"
            )
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch, res = [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._block(ch, base_channels * mult, emb_dim, dropout, res in attention_resolutions))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < levels - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [ResBlock(ch, ch, emb_dim, dropout), AttentionBlock(ch, head_channels), ResBlock(ch, ch, emb_dim, dropout)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                self.up.append(
                    self._block(ch + skip_channels.pop(), out, emb_dim, dropout, res in attention_resolutions)
                )
                ch = out
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.head = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @staticmethod
    def _block(in_ch: int, out_ch: int, emb_dim: int, dropout: float, attention: bool) -> nn.Module:
        res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        return _ResAttn(res, AttentionBlock(out_ch)) if attention else res

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))
        if self.label_emb is not None:
            if y is None:  # unconditional call of a conditional model: the null label
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(y)
        h = self.stem(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for block in self.up:
            h = block(h) if isinstance(block, Upsample) else block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.head(h)


class _ResAttn(nn.Module):
    """A residual block followed by self-attention (one unit of the U-Net at attention resolutions)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock) -> None:
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))
