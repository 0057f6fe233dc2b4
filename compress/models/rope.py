"""Rotary position embeddings (RoPE) and the scaling variants decoder configs use.

Follows the Hugging Face convention: the head is split into two halves that rotate
together (`rotate_half`), not interleaved pairs. GGUF files store Q/K in the
interleaved order and are un-permuted on import (see `compress.formats.gguf`).

Axes: B batch, T positions, N heads, H head_dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

ROPE_KINDS = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How the base RoPE frequencies are rescaled for a longer context."""

    kind: str = "default"  # one of ROPE_KINDS
    factor: float = 1.0  # context extension factor (linear, llama3, yarn)
    low_freq_factor: float = 1.0  # llama3: wavelengths beyond original/low are fully scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original/high are kept
    original_max_position_embeddings: int = 8192  # llama3, yarn: pretraining context
    beta_fast: float = 32.0  # yarn: rotations where extrapolation ends
    beta_slow: float = 1.0  # yarn: rotations where interpolation starts
    attention_factor: float | None = None  # yarn: cos/sin multiplier; None derives it from factor
    mscale: float | None = None  # yarn (DeepSeek style) numerator for attention_factor
    mscale_all_dim: float | None = None  # yarn (DeepSeek style) denominator for attention_factor
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"unsupported RoPE scaling {self.kind!r}; supported: {', '.join(ROPE_KINDS)}")


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies [head_dim // 2] and the cos/sin attention factor."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    s = scaling or RopeScaling()
    if s.kind == "default":
        return inv_freq, 1.0
    if s.kind == "linear":
        return inv_freq / s.factor, 1.0
    if s.kind == "llama3":
        old = s.original_max_position_embeddings
        low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    # yarn
    def mscale_of(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = s.factor
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = mscale_of(factor, s.mscale) / mscale_of(factor, s.mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)

    def correction_dim(rotations):
        return head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv.astype(np.float32), float(attention_factor)


def rope_tables(positions: jnp.ndarray, inv_freq: np.ndarray, attention_factor: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables [B, T, H] for integer positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, N, H] by the tables [B, T, H]; computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
