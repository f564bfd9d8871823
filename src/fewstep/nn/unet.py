"""The U-Net denoising network (Ho et al. 2020, Appendix B; Dhariwal & Nichol 2021, Sec. 3).

It knows nothing of schedules or samplers. Every network of :mod:`fewstep.nn` has the signature

    net(x, t, *, y=None, context=None, context_mask=None, pooled=None) -> Tensor shaped like x

``x`` [B, C, H, W]; ``t`` [B] (or 0-d) float timesteps in [0, T-1]; ``y`` [B] class labels (label
``num_classes`` is the null label of classifier-free guidance); ``context`` [B, L, context_dim] text
tokens, ``context_mask`` [B, L] bool (True = real token), ``pooled`` [B, context_dim]. Text
conditioning enters through cross-attention (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", Sec. 3.3) and the pooled embedding is added to the time embedding
(as in Imagen / SDXL).
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


def check_conditioning(
    name: str,
    x: Tensor,
    context_dim: int | None,
    context: Tensor | None,
    context_mask: Tensor | None,
    pooled: Tensor | None,
) -> None:
    """Refuse text conditioning a network cannot use, and shapes it would misread."""
    given = [k for k, v in (("context", context), ("context_mask", context_mask), ("pooled", pooled)) if v is not None]
    if context_dim is None:
        if given:
            raise ValueError(
                f"{name} was built without context_dim but got {', '.join(given)}: build it with "
                f"context_dim=<text embedding width> (model.context_dim=...) or call it without text conditioning"
            )
        return
    b = x.shape[0]
    if context is not None and (context.ndim != 3 or context.shape[0] != b or context.shape[2] != context_dim):
        raise ValueError(f"context must be [B={b}, L, context_dim={context_dim}], got {list(context.shape)}")
    if context_mask is not None:
        if context is None:
            raise ValueError("context_mask was given without context")
        if context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]:
            raise ValueError(
                f"context_mask must be a bool tensor [B, L]={list(context.shape[:2])} (True = real token), "
                f"got {context_mask.dtype} {list(context_mask.shape)}"
            )
    if pooled is not None and tuple(pooled.shape) != (b, context_dim):
        raise ValueError(f"pooled must be [B={b}, context_dim={context_dim}], got {list(pooled.shape)}")


class CrossAttention(nn.Module):
    """Multi-head attention from tokens [B, N, dim] to text tokens [B, L, context_dim].

    One learned null key/value is always attended besides the text tokens, so a row whose
    ``context_mask`` is all False (or ``context=None``) attends to the null token alone: a learned
    "no text" output instead of the NaN of a softmax over nothing. The output projection starts at
    zero, so a network gains text conditioning as a residual that begins as the identity.
    """

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by its {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.null_kv = nn.Parameter(0.02 * torch.randn(2 * dim))
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        kv = self.null_kv.expand(b, 1, 2 * d)
        mask = None
        if context is not None:
            text = self.kv(context)
            kv = torch.cat([kv.to(text.dtype), text], dim=1)
            if context_mask is not None:  # the null token (column 0) is always attended
                mask = torch.cat([context_mask.new_ones(b, 1), context_mask], dim=1)[:, None, None, :]
        k, v = kv.to(q.dtype).reshape(b, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, heads, n, d/heads]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


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
    """Multi-head self-attention over the spatial positions, residual; with ``context_dim``, then
    cross-attention to the text tokens (GroupNorm, queries from the image), residual too."""

    def __init__(self, channels: int, head_channels: int = 32, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        # Created last and only with context_dim: without it the state dict and the RNG draws of
        # the initialisation are those of the unconditional network (old checkpoints load as-is).
        self.cross_norm = group_norm(channels) if context_dim is not None else None
        self.cross = CrossAttention(channels, context_dim, self.heads) if context_dim is not None else None

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        x = x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))
        if self.cross is not None:
            tokens = self.cross_norm(x).flatten(2).transpose(1, 2)  # [b, hw, c]
            x = x + self.cross(tokens, context, context_mask).transpose(1, 2).reshape(b, c, h, w)
        return x


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
        context_dim: if set, ``forward`` takes text tokens ``context`` (cross-attention at every
            attention block, the middle one included) and a ``pooled`` text embedding (added to the
            time embedding). Without it the network is exactly the unconditional one.
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
        context_dim: int | None = None,
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
        self.base_channels, self.context_dim = base_channels, context_dim
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch, res = [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                attention = res in attention_resolutions
                self.down.append(self._block(ch, base_channels * mult, emb_dim, dropout, attention, context_dim))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < levels - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, dropout),
                AttentionBlock(ch, head_channels, context_dim),
                ResBlock(ch, ch, emb_dim, dropout),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                attention = res in attention_resolutions
                self.up.append(self._block(ch + skip_channels.pop(), out, emb_dim, dropout, attention, context_dim))
                ch = out
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.head = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        # After every other module, so that context_dim=None draws the same initial weights as before.
        self.pooled_proj = nn.Linear(context_dim, emb_dim) if context_dim is not None else None

    @staticmethod
    def _block(
        in_ch: int, out_ch: int, emb_dim: int, dropout: float, attention: bool, context_dim: int | None
    ) -> nn.Module:
        res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        return _ResAttn(res, AttentionBlock(out_ch, context_dim=context_dim)) if attention else res

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        y: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        check_conditioning("UNet", x, self.context_dim, context, context_mask, pooled)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))
        if self.label_emb is not None:
            if y is None:  # unconditional call of a conditional model: the null label
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(y)
        if pooled is not None:
            emb = emb + self.pooled_proj(pooled)
        text = (context, context_mask)
        h = self.stem(x)
        skips = [h]
        for block in self.down:
            h = self._run_block(block, h, emb, text)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb), *text), emb)
        for block in self.up:
            h = h if isinstance(block, Upsample) else torch.cat([h, skips.pop()], dim=1)
            h = self._run_block(block, h, emb, text)
        return self.head(h)

    @staticmethod
    def _run_block(block: nn.Module, h: Tensor, emb: Tensor, text: tuple[Tensor | None, Tensor | None]) -> Tensor:
        if isinstance(block, (Downsample, Upsample)):
            return block(h)
        return block(h, emb, *text) if isinstance(block, _ResAttn) else block(h, emb)


class _ResAttn(nn.Module):
    """A residual block followed by self-attention (one unit of the U-Net at attention resolutions)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock) -> None:
        super().__init__()
        self.res, self.attn = res, attn

    def forward(
        self, x: Tensor, emb: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        return self.attn(self.res(x, emb), context, context_mask)
