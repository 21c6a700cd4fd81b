"""Perceiver resampler that turns the repeated ArcFace embedding into a few face tokens.

Parameter names mirror the EchoVideo release (`face_prj_wofc.*` in its transformer
checkpoint): `latents`, `proj_in`, `proj_out`, `norm_out`, and `layers.{i}.0` (attention)
/ `layers.{i}.1` (feed-forward, a Sequential whose Linear layers sit at indices 1 and 3).
"""

import math

import torch
from torch import nn


class PerceiverAttention(nn.Module):
    """Latent queries attend over `[input tokens, latents]`.

    Queries come from the normed latents; keys and values from the normed input tokens
    concatenated with the normed latents. q and k are each scaled by dim_head^-1/4 (so
    their product carries the usual 1/sqrt(dim_head)) and the softmax runs in float32,
    as in the release.
    """

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        tokens = self.norm1(tokens)
        latents = self.norm2(latents)
        query = self._split_heads(self.to_q(latents))
        key, value = self.to_kv(torch.cat([tokens, latents], dim=1)).chunk(2, dim=-1)
        key, value = self._split_heads(key), self._split_heads(value)

        scale = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        weights = (query * scale) @ (key * scale).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).type(weights.dtype)
        out = (weights @ value).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear, bias-free, indices 0..3 as in the release."""
    inner_dim = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner_dim, bias=False),
        nn.GELU(),
        nn.Linear(inner_dim, dim, bias=False),
    )


class FaceResampler(nn.Module):
    """`num_queries` learned latents read identity tokens; output is `output_dim` wide.

    Release sizes: input 512 (ArcFace), width 1024, 4 layers, 12 heads x 64, 16 queries,
    feed-forward x4, output 768 (SigLIP width).
    """

    def __init__(
        self,
        input_dim: int = 512,
        dim: int = 1024,
        depth: int = 4,
        heads: int = 12,
        dim_head: int = 64,
        num_queries: int = 16,
        output_dim: int = 768,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(input_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x N x input_dim -> B x num_queries x output_dim."""
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        tokens = self.proj_in(tokens)
        for attention, ff in self.layers:
            latents = attention(tokens, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
