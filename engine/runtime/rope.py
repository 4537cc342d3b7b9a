"""Rotary-embedding tables: inverse frequencies (default, linear, llama3 scaling) and the cos|sin cache.

Computed in float32 exactly as transformers does (positions times inverse frequencies, then cos and sin), so the
rotated q/k match it bit for bit in fp32.
"""
from __future__ import annotations

import math

import torch

from engine.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def cos_sin_cache(rope: RopeConfig, head_dim: int, max_positions: int, device) -> torch.Tensor:
    """(max_positions, head_dim) float32: [cos | sin] of each position's half-dimension angles."""
    inv = inverse_frequencies(rope, head_dim).to(device)
    pos = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = pos[:, None] * inv[None, :]  # (P, D/2)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)
