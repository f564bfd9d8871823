"""The Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

A ViT over image patches whose blocks are conditioned by adaLN-Zero (Sec. 3.2): the timestep,
class-label and pooled-text embeddings are summed into one vector ``c`` that regresses the shift,
scale and gate of every LayerNorm and residual branch; the regressing layers start at zero so that
every block starts as the identity. With ``context_dim`` each block also cross-attends to the text
tokens between self-attention and the MLP (the "cross-attention" variant of Sec. 3.2, as in
PixArt-alpha). Same signature as every network of :mod:`fewstep.nn`:

    net(x, t, *, y=None, context=None, context_mask=None, pooled=None) -> Tensor shaped like x
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.nn.unet import CrossAttention, check_conditioning, timestep_embedding


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding [grid * grid, dim] (MAE / DiT, Sec. 3.1 "Patchify"):
    half the channels encode the row, half the column, each with the 1-D Transformer embedding."""
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed(p: Tensor) -> Tensor:
        args = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` per sample (``1 +`` so that zero-init is the plain LayerNorm)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """One adaLN-Zero block (Sec. 3.2, Fig. 3), with an optional cross-attention sub-layer."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, context_dim: int | None) -> None:
        super().__init__()
        # No affine LayerNorm parameters: the scale and shift come from the conditioning vector.
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # Text tokens are not pooled into c: they need their own attention (ungated, zero-init output).
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6) if context_dim is not None else None
        self.cross = CrossAttention(dim, context_dim, heads) if context_dim is not None else None

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), context, context_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate) and a linear map of each token to its patch of pixels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023, Sec. 3).

    The defaults are ``model=dit_tiny``: 2.36 M parameters on 1x32x32 images, 64 tokens of 4x4
    patches so that it trains on a CPU. Smaller patches are better at equal parameters but cost more
    (the paper's Sec. 4 / Fig. 6): ``patch_size=2`` quadruples the tokens, worth it on a GPU.

    Args:
        image_size: side of the (square) input; must be divisible by ``patch_size``.
        in_channels: image channels; the output has the same number (no learned variance).
        patch_size: side of the square patches, one token each (Sec. 3.1, "Patchify").
        hidden_size: token width; divisible by 4 (2-D sin-cos positions) and by ``num_heads``.
        depth: number of DiT blocks.
        num_heads: attention heads (self- and cross-attention).
        mlp_ratio: MLP width over ``hidden_size``.
        dropout: dropout of the attention weights and the MLP hidden layer.
        num_classes: if set, ``forward`` takes labels ``y``; label ``num_classes`` is the null label
            of classifier-free guidance (and ``y=None`` means it).
        context_dim: if set, ``forward`` takes text tokens ``context`` (cross-attention in every
            block) and a ``pooled`` text embedding (added to the conditioning vector).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 1,
        patch_size: int = 4,
        hidden_size: int = 144,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_classes: int | None = None,
        context_dim: int | None = None,
        frequency_size: int = 256,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not divisible by patch_size={patch_size}; "
                f"use model.patch_size dividing {image_size} (e.g. 2 or 4) or an image_size that is a multiple of it"
            )
        if hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by 4 (2-D sin-cos positions) and by "
                f"num_heads={num_heads}; change model.hidden_size or model.num_heads"
            )
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.num_classes, self.context_dim, self.frequency_size = num_classes, context_dim, frequency_size
        self.grid = image_size // patch_size

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # Fixed, not learned (Sec. 3.1); a non-persistent buffer: rebuilt, not stored in checkpoints.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.t_embedder = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.pooled_embedder = nn.Linear(context_dim, hidden_size) if context_dim is not None else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, dropout, context_dim) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the reference implementation: Xavier for linear maps (the patch conv seen as one), N(0, 0.02)
        # for the embedders, then zero for every adaLN regressor and the output (adaLN-Zero, Sec. 3.2).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross is not None:  # the Xavier loop above overwrote its zero output projection
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, N, p * p * C] tokens back to [B, C, H, W] images."""
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.in_channels
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

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
        check_conditioning("DiT", x, self.context_dim, context, context_mask, pooled)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"DiT was built for {self.image_size}x{self.image_size} images, got {list(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # [B, N, D]
        c = self.t_embedder(timestep_embedding(t, self.frequency_size).to(x.dtype))
        if self.y_embedder is not None:
            if y is None:  # unconditional call of a conditional model: the null label
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            c = c + self.y_embedder(y)
        if pooled is not None:
            c = c + self.pooled_embedder(pooled)
        for block in self.blocks:
            h = block(h, c, context, context_mask)
        return self.unpatchify(self.final_layer(h, c))
