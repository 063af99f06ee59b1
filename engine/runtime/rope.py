"""Rotary-embedding tables: inverse frequencies (with optional linear / llama3 scaling) and cos/sin per position."""
from __future__ import annotations

import math

import numpy as np

from engine.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """(head_dim / 2,) float32 inverse frequencies, computed as transformers does (float32), scaled per rope_scaling."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).astype(np.float32)
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    old_context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_context / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: (max_position_embeddings, head_dim) float32 for every position, halves repeated (HF layout)."""
    positions = np.arange(config.max_position_embeddings, dtype=np.float32)
    freqs = np.outer(positions, inverse_frequencies(config)).astype(np.float32)  # (P, head_dim/2)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
