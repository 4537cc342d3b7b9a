"""Rotary-embedding tables: inverse frequencies (default, linear, dynamic NTK, YaRN, llama3) and the cos|sin rows
the rotary op reads (`RotaryTable`).

Computed in float32 exactly as transformers' modeling_rope_utils.py does (the same expressions in the same order,
then positions times inverse frequencies, cos and sin, times the attention factor), so the rotated q/k match it bit
for bit in fp32. Not here: applying the rotation (kernels/rotary.py, fused into kernels/kv_store.py).
"""
from __future__ import annotations

import math

import torch

from engine.config import RopeConfig


def _default(theta, head_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3(rope: RopeConfig, inv: torch.Tensor) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int) -> torch.Tensor:
    """transformers' `_compute_yarn_parameters`: interpolate the low frequencies, keep the high ones, ramp between
    the dimensions that turn beta_fast and beta_slow times over the original length."""
    base, length = rope.theta, rope.original_max_position_embeddings

    def correction_dim(rotations):
        return (dim * math.log(length / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast or 32), correction_dim(rope.beta_slow or 1)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """(head_dim / 2,) float32 on the CPU. Dynamic NTK: those of sequences within the trained length."""
    if rope.kind == "yarn":
        return _yarn(rope, head_dim)
    if rope.kind == "dynamic":  # transformers' init-time value: the formula at seq_len = max_position_embeddings
        n = rope.max_position_embeddings
        theta = rope.theta * ((rope.factor * n / n) - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
        return _default(theta, head_dim)
    inv = _default(rope.theta, head_dim)
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        return _llama3(rope, inv)
    return inv


def dynamic_inverse_frequencies(rope: RopeConfig, head_dim: int, seq_len: int) -> torch.Tensor:
    """Dynamic NTK for a sequence of `seq_len` tokens: transformers' `_compute_dynamic_ntk_parameters` given the
    int64 tensor max(position_ids) + 1, so the float32 rounding is its own:
    base' = base * (factor * L / L_max - (factor - 1)) ** (d / (d - 2))."""
    n = rope.max_position_embeddings
    length = torch.maximum(torch.tensor(seq_len, dtype=torch.int64), torch.tensor(n, dtype=torch.int64))
    theta = rope.theta * ((rope.factor * length / n) - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
    return _default(theta, head_dim)


def attention_factor(rope: RopeConfig) -> float:
    """What cos and sin are multiplied by: YaRN's mscale (0.1 ln(factor) + 1, or the ratio of two), 1 elsewhere."""
    if rope.kind != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return float(mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim))
    return mscale(rope.factor)


def cos_sin_rows(positions: torch.Tensor, inv: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(T, D) float32 [cos | sin] of positions (T,) int64 times inverse frequencies, (D/2,) or one row each (T, D/2)."""
    freqs = positions[:, None].float() * inv  # (T, D/2)
    return torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1)


def cos_sin_cache(rope: RopeConfig, head_dim: int, max_positions: int, device) -> torch.Tensor:
    """(max_positions, head_dim) float32: [cos | sin] of each position's half-dimension angles."""
    inv = inverse_frequencies(rope, head_dim).to(device)
    pos = torch.arange(max_positions, dtype=torch.int64, device=device)
    return cos_sin_rows(pos, inv[None, :], attention_factor(rope))


class RotaryTable:
    """The (rows, D) float32 cos|sin table the rotary op reads by row index (kernels/kv_store.py).

    Rows [0, max_positions): one per position, for the static rope types, and for dynamic NTK the trained base.
    Under dynamic NTK (transformers' "dynamic") a sequence longer than the trained length rotates with a base of its
    own length: all of a prompt's tokens with the prompt's length (one prefill forward in transformers, however
    many chunks here), each later token with its position + 1. Those tokens get rows of their own in the step rows
    [max_positions, max_positions + step_rows), rewritten in place for every step, so a CUDA graph captured on this
    table reads each step's rows at replay. Keys already cached keep the rotation they were written with, as in
    transformers.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, step_rows: int, device: torch.device):
        self.rope, self.head_dim, self.device = rope, head_dim, device
        self.base_rows, self.step_rows = max_positions, step_rows if rope.dynamic_from is not None else 0
        self.table = torch.zeros(max_positions + self.step_rows, head_dim, dtype=torch.float32, device=device)
        self.table[:max_positions] = cos_sin_cache(rope, head_dim, max_positions, device)
        self._inv: dict[int, torch.Tensor] = {}  # sequence length -> its inverse frequencies (host), a few recent

    @property
    def dynamic(self) -> bool:
        """Whether rows depend on sequence lengths (dynamic NTK); else `rows` returns the positions as they are."""
        return self.step_rows > 0

    def _inverse(self, seq_len: int) -> torch.Tensor:
        inv = self._inv.get(seq_len)
        if inv is None:
            if len(self._inv) >= 256:
                self._inv.clear()
            inv = self._inv[seq_len] = dynamic_inverse_frequencies(self.rope, self.head_dim, seq_len)
        return inv

    def rows(self, positions: list[int], lengths: list[int]) -> list[int]:
        """Each token's row of `table`: its position, or a step row for a token whose length (`lengths`: the
        length its sequence's dynamic base is computed from) exceeds the trained length. The step rows' values are
        queued for the device here, on the current stream, ahead of the step that reads them."""
        start = self.rope.dynamic_from
        if not self.dynamic or not lengths or max(lengths) <= start:
            return positions
        picked = [i for i, n in enumerate(lengths) if n > start]
        if len(picked) > self.step_rows:
            raise ValueError(f"{len(picked)} tokens past the trained length in one step; the table has room for "
                             f"{self.step_rows}")
        lens = [lengths[i] for i in picked]
        distinct = sorted(set(lens))
        which = {n: j for j, n in enumerate(distinct)}
        inv = torch.stack([self._inverse(n) for n in distinct])[torch.tensor([which[n] for n in lens])]  # (k, D/2)
        values = cos_sin_rows(torch.tensor([positions[i] for i in picked], dtype=torch.int64), inv)
        if self.device.type == "cuda":  # pinned by torch's caching host allocator: kept until the copy has run
            values = values.pin_memory()
        self.table[self.base_rows:self.base_rows + len(picked)].copy_(values, non_blocking=True)
        out = list(positions)
        for j, i in enumerate(picked):
            out[i] = self.base_rows + j
        return out
