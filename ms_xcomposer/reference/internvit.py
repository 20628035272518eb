"""InternViT (InternVL's vision model), pixel shuffle and `mlp1` in plain PyTorch, written from
REFERENCE_INTERNVL.md sections 3 and 4 (the reference side of InternVL parity checks).

Module and parameter names are the HF keys under `vision_model.` and `mlp1.`. Both flavours: RMSNorm + q/k norm
over all heads + no qkv bias (InternViT-6B), LayerNorm + qkv bias (InternViT-300M). As the official naive path:
the position grid is resized bicubically (float32, align_corners False) on every call, the attention softmax runs
in the working dtype, there is no final norm.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ms_xcomposer.models.internvl.config import InternViTConfig
from ms_xcomposer.reference.internlm2 import RMSNorm

MLP1_EPS = 1e-5  # torch's LayerNorm default, not the vision 1e-6 (quirk 10)


class InternVisionEmbeddings(nn.Module):
    """CLS + Conv2d patches (row-major) + the position table, its 2-D grid resized to the input's patch grid."""

    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, c, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, c))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixels.to(dtype))  # [B, C, gh, gw]
        b, c, gh, gw = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(dtype).expand(b, 1, c)
        pos = self.position_embedding
        grid = pos[:, 1:].reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.reshape(1, c, gh * gw).permute(0, 2, 1).to(dtype)
        return torch.cat([cls, tokens], dim=1) + torch.cat([pos[:, :1].to(dtype), grid], dim=1)


class InternAttention(nn.Module):
    """Fused qkv ([all q | all k | all v] rows), optional RMSNorm of q and k over all C channels, q * hd^-0.5,
    softmax in the working dtype, proj (with bias)."""

    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(c, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(c, cfg.layer_norm_eps)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

        scores = (heads(q) * self.head_dim ** -0.5) @ heads(k).transpose(-2, -1)
        out = scores.softmax(dim=-1) @ heads(v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class InternMLP(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


def _norm(cfg: InternViTConfig) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class InternVisionEncoderLayer(nn.Module):
    """x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x))."""

    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = InternAttention(cfg)
        self.mlp = InternMLP(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class InternVisionModel(nn.Module):
    """`vision_model.*`: `hidden_states(pixels)` is the HF list [embeddings, layer 1, ..., layer L]."""

    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)

    def hidden_states(self, pixels: torch.Tensor) -> List[torch.Tensor]:
        """pixels [T, 3, H, W] -> [T, 1 + (H/14)(W/14), C] for the embeddings and after each layer."""
        states = [self.embeddings(pixels)]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return states


def pixel_shuffle(x: torch.Tensor, version: str, scale: float = 0.5) -> torch.Tensor:
    """[T, rows, cols, C] -> [T, rows*s, cols*s, C/s^2] in the official steps (REFERENCE_INTERNVL.md 4.4):
    pair columns on channels, swap the grid axes, pair rows on channels, and for v2 swap back (v1 leaves the
    grid transposed)."""
    t, rows, cols, c = x.shape
    x = x.reshape(t, rows, int(cols * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(t, int(cols * scale), int(rows * scale), int(c / (scale * scale)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def shuffled_tokens(hidden: torch.Tensor, version: str) -> torch.Tensor:
    """ViT hidden state [T, 1 + g*g, C] -> the tokens entering mlp1 [T, g*g/4, 4C] (CLS dropped)."""
    t, n, c = hidden.shape
    side = math.isqrt(n - 1)
    x = pixel_shuffle(hidden[:, 1:].reshape(t, side, side, c), version)
    return x.reshape(t, -1, x.shape[-1])


def mlp1(in_features: int, hidden: int) -> nn.Sequential:
    """`mlp1.{0,1,3}`: LayerNorm(eps 1e-5) -> Linear -> GELU -> Linear."""
    return nn.Sequential(nn.LayerNorm(in_features, eps=MLP1_EPS), nn.Linear(in_features, hidden), nn.GELU(),
                         nn.Linear(hidden, hidden))
