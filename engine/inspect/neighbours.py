"""Nearest tokens in an embedding matrix by cosine similarity: how the model's token space is organised."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import EngineError
from engine.model import Model
from engine.runtime.weights import widen

MATRICES = ("embed", "lm_head")


@dataclass
class Neighbour:
    """A token near the query: rank, id, vocabulary piece, cosine similarity."""

    rank: int
    token_id: int
    piece: str
    cosine: float


def token_for_word(model: Model, word: str) -> int:
    """The one token id a word stands for: its encoding (no BOS) if one token, else the exact vocabulary piece;
    EngineError listing the pieces when it is several tokens."""
    tokenizer = model.tokenizer
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0]
    exact = tokenizer.token_to_id(word)
    if exact is not None:
        return exact
    pieces = " ".join(tokenizer.id_to_token(i) for i in ids)
    raise EngineError(f"{word!r} is {len(ids)} tokens ({pieces}); give one token (a piece such as "
                      f"{tokenizer.id_to_token(ids[0])!r}, or --id N)")


def embedding_matrix(model: Model, matrix: str = "embed") -> np.ndarray:
    """(vocab, hidden) float32: the input embeddings ('embed') or the output embeddings ('lm_head'), widened exactly
    from the checkpoint's dtype where the weights are held 16-bit."""
    if matrix not in MATRICES:
        raise EngineError(f"matrix must be one of {', '.join(MATRICES)}, got {matrix!r}")
    return widen(getattr(model.backend.weights, matrix))


def nearest_tokens(model: Model, token_id: int, k: int = 10, matrix: str = "embed") -> list[Neighbour]:
    """The k tokens whose rows of `matrix` have the highest cosine similarity with token_id's row (itself left out).

    Computed in float32 over the whole matrix (vocab x hidden); ties by id.
    """
    e = embedding_matrix(model, matrix)
    if not 0 <= int(token_id) < e.shape[0]:
        raise EngineError(f"token id {token_id} is outside the vocabulary (0..{e.shape[0] - 1})")
    norms = np.linalg.norm(e, axis=1)
    norms[norms == 0] = 1
    cos = (e @ e[int(token_id)]) / (norms * norms[int(token_id)])
    cos[int(token_id)] = -np.inf
    k = max(1, min(int(k), e.shape[0] - 1))
    order = np.lexsort((np.arange(cos.size), -cos))[:k]
    tokenizer = model.tokenizer
    return [Neighbour(rank=r + 1, token_id=int(t), piece=tokenizer.id_to_token(int(t)), cosine=float(cos[t]))
            for r, t in enumerate(order)]
