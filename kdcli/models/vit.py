"""A small vision transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Patch embedding by a conv whose kernel and stride are the patch size, a learned class token and
position embedding, ``depth`` pre-norm encoder blocks (x + attention(LN(x)), x + MLP(LN(x))), a
final LayerNorm and a linear head on the class token. Layout and names follow timm's
VisionTransformer (``patch_embed.proj``, ``blocks.0.attn.qkv``, ``blocks.0.mlp.fc1``, ``head``).

Written for torch-pruning: every weight is an explicit ``nn.Linear``, queries, keys and values
come from one ``qkv`` Linear(dim, 3*dim) whose outputs are laid out [q | k | v], each as
[head 0 | head 1 | ...]. ``head_dim`` (and with it the softmax scale) is fixed and the attention
reshapes with ``-1`` for the head count, so a model whose whole heads were removed runs as it is
and the heads left compute what they did; removing single dims of a head is not supported (the
reshape fails), hence ``prune_head_dims=False`` below.

What prunes. Through kdcli's StructuredPruner: the MLP hidden widths (``fc1`` out, ``fc2`` in),
by channels, and the attention blocks by whole heads (:mod:`kdcli.prune.heads`: the group
rooted at ``qkv`` has one unit per head, the head's rows of q, k and v and its columns of
``proj``; :meth:`VisionTransformer.attention_heads` tells the pruner the head count). Its probe
keeps out the residual stream (patch embedding, ``proj`` and ``fc2`` outputs, the class token
and position embedding: LayerNorm normalises over those channels, so removing one is not zeroing
it). Torch-pruning's own pruners take :meth:`VisionTransformer.attention_heads` as ``num_heads``
for the same head pruning; nothing needs fixing afterwards.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with one qkv Linear and an output projection.

    ``head_dim`` is fixed and the number of heads follows ``qkv.out_features``, so a model whose
    heads were pruned (whole heads, in q, k, v and the projection's inputs) runs as it is.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"vit dim {dim} must be a multiple of heads {heads}")
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    @property
    def num_heads(self) -> int:
        return self.qkv.out_features // (3 * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # [B, N, 3*H*hd] -> [3, B, H, N, hd]; -1 is the head count as the Linear is now
        qkv = self.qkv(x).reshape(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class Mlp(nn.Module):
    """Linear, GELU, Linear: the transformer's feed-forward block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier on the class token; the input's H and W must be multiples of ``patch_size``."""

    def __init__(self, input_shape, num_classes: int, patch_size: int = 4, dim: int = 192, depth: int = 6,
                 heads: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"vit expects an image input shape (C, H, W), got {list(input_shape)}")
        c, h, w = input_shape
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"vit patch_size {patch_size} must divide the input size {h}x{w}")
        if depth < 1 or mlp_ratio <= 0:
            raise ValueError(f"vit needs depth >= 1 and mlp_ratio > 0, got {depth} and {mlp_ratio}")
        tokens = (h // patch_size) * (w // patch_size) + 1
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(c, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def attention_heads(self) -> dict[nn.Linear, int]:
        """``{qkv Linear: number of heads}`` of every attention block, as torch-pruning's pruners
        take it: ``MetaPruner(..., num_heads=model.attention_heads(), prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=r)`` roots each attention group at ``proj``'s
        input channels and removes whole heads (the same head of q, k and v). The counts follow
        the model as it is now (``qkv.out_features // (3 * head_dim)``)."""
        return {m.qkv: m.num_heads for m in self.modules() if isinstance(m, Attention)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, patches, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(input_shape=(3, 32, 32), num_classes: int = 10, patch_size: int | None = None, dim: int = 192,
        depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0) -> VisionTransformer:
    """Small ViT (Dosovitskiy et al. 2021): ``dim`` wide (``heads`` heads), ``depth`` blocks, MLP
    ``mlp_ratio`` times wider. ``patch_size``: by default 4 for inputs up to 64x64, 16 above."""
    if patch_size is None:
        patch_size = 4 if max(input_shape[1:]) <= 64 else 16
    return VisionTransformer(input_shape, num_classes, patch_size=patch_size, dim=dim, depth=depth, heads=heads,
                             mlp_ratio=mlp_ratio)
