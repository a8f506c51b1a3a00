"""An SDXL-architecture UNet in the original (SGM/ldm) module layout.

Module paths match the SDXL checkpoints that ComfyUI and sd-scripts load
(``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` …), so kohya keys come
out exactly as for the real model.  Used with random weights: full size where
shapes matter, reduced width for fast CPU runs.  KOALA-700M is the same
architecture with one residual block per level, transformer depths (0, 2, 5)
and no middle block.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4)
    num_res_blocks: tuple = (2, 2, 2)
    transformer_depth: tuple = (0, 2, 10)         # per level, input side
    transformer_depth_output: tuple = (0, 2, 10)  # per level, output side
    transformer_depth_middle: int = 10            # -1: a single ResBlock; -2: no middle block
    context_dim: int = 2048
    adm_in_channels: int = 2816
    num_head_channels: int = 64
    in_channels: int = 4
    out_channels: int = 4
    norm_groups: int = 32


def sdxl_config() -> UNetConfig:
    """SDXL base 1.0 UNet (2.6 B parameters, 70 transformer blocks)."""
    return UNetConfig()


def koala_700m_config() -> UNetConfig:
    """KOALA-700M UNet: SDXL with fewer residual and transformer blocks (21 transformer blocks)."""
    return UNetConfig(num_res_blocks=(1, 1, 1), transformer_depth=(0, 2, 5), transformer_depth_output=(0, 2, 5),
                      transformer_depth_middle=-2)


def reduced(cfg: UNetConfig, model_channels: int = 32, context_dim: int = 64, head_channels: int = 16,
            depth: tuple | None = None, middle: int | None = None) -> UNetConfig:
    """Same block structure at reduced width (optionally fewer transformer blocks) for CPU runs."""
    changes = dict(model_channels=model_channels, context_dim=context_dim, num_head_channels=head_channels,
                   adm_in_channels=2 * context_dim, norm_groups=min(32, model_channels // 2 or 1))
    if depth is not None:
        changes.update(transformer_depth=tuple(depth), transformer_depth_output=tuple(depth))
    if middle is not None:
        changes.update(transformer_depth_middle=middle)
    return dataclasses.replace(cfg, **changes)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, inner = q.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, inner))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, dim_head: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, heads * dim_head)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(heads * dim_head, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(heads * dim_head, ch)

    def forward(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        x = self.proj_in(x)
        for blk in self.transformer_blocks:
            x = blk(x, context)
        x = self.proj_out(x)
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2) + x_in


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class SDXLUNet(nn.Module):
    """ε-prediction UNet: forward(x, timesteps, context, y) → ε̂ (SDXL conditioning: context + pooled/size vector y)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        emb = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb)))

        def transformer(ch, depth):
            heads = ch // cfg.num_head_channels
            return SpatialTransformer(ch, heads, cfg.num_head_channels, depth, cfg.context_dim, g)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips, ch = [mc], mc
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks[level]):
                layers = [ResBlock(ch, emb, mult * mc, g)]
                ch = mult * mc
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
        # middle: depth >= 0 → ResBlock, transformer, ResBlock; -1 → one ResBlock; -2 → no middle block
        self.middle_block = None
        if cfg.transformer_depth_middle >= -1:
            mid = [ResBlock(ch, emb, ch, g)]
            if cfg.transformer_depth_middle >= 0:
                mid += [transformer(ch, cfg.transformer_depth_middle), ResBlock(ch, emb, ch, g)]
            self.middle_block = TimestepEmbedSequential(*mid)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skips.pop(), emb, mult * mc, g)]
                ch = mult * mc
                if cfg.transformer_depth_output[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth_output[level]))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def _run(self, block, h, emb, context):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x, timesteps, context, y):
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        emb = emb + self.label_emb(y.to(emb.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            hs.append(h)
        if self.middle_block is not None:
            h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
