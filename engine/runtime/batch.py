"""The one seam every way of running the model goes through: a ragged batch of sequence steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class SequenceStep:
    """One sequence's part of a forward step: its KV cache, the new token ids (appended at cache.length onwards),
    and whether logits are wanted for every new token (verification, scoring) or only the last (generation)."""

    cache: Any
    token_ids: np.ndarray  # (n,) int64
    all_logits: bool = False

    def __post_init__(self):
        self.token_ids = np.asarray(self.token_ids, dtype=np.int64).reshape(-1)
        if self.token_ids.size == 0:
            raise ValueError("a sequence step needs at least one token")
