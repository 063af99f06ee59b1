"""Which tokens the model considers next, and how sure it is: the top-k of the next-token distribution, raw and
after the sampling settings (repetition penalty, temperature, top-k, top-p, min-p: what is left, renormalised)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.generation.sampling import SamplingParams, apply_repetition_penalty, probabilities
from engine.model import Model
from engine.runtime.batch import SequenceStep


@dataclass
class NextToken:
    """One candidate next token: rank by logit, id, piece, logit, softmax probability, and its probability under the
    sampling settings (0 where they remove it; greedy: 1 for the token greedy decoding picks)."""

    rank: int
    token_id: int
    piece: str
    logit: float
    probability: float
    sampled_probability: float


@dataclass
class NextTokens:
    """The top-k next tokens after a prompt, the sampling settings used, and how many tokens those settings keep."""

    prompt_ids: list[int]
    candidates: list[NextToken]
    sampling: SamplingParams
    kept: int  # tokens with non-zero probability under the sampling settings (greedy: 1)


def next_token_distributions(logits: np.ndarray, sampling: SamplingParams,
                             previous_ids=()) -> tuple[np.ndarray, np.ndarray]:
    """logits (vocab,) float32 -> (softmax probabilities, probabilities under `sampling`), each (vocab,) float64."""
    raw = logits.astype(np.float64)
    raw = np.exp(raw - raw.max())
    raw /= raw.sum()
    if sampling.greedy:
        chosen = np.zeros_like(raw)
        chosen[int(np.argmax(apply_repetition_penalty(logits, previous_ids, sampling.repetition_penalty)))] = 1.0
        return raw, chosen
    return raw, probabilities(logits, sampling, previous_ids)


def next_tokens(model: Model, prompt, k: int = 10, sampling: SamplingParams | None = None) -> NextTokens:
    """The k most likely next tokens after `prompt` (text or ids), by logit, with both probabilities.

    The repetition penalty (when set) counts the prompt's tokens as already seen, as generation does.
    """
    ids = model.prompt_ids(prompt)
    sampling = sampling or SamplingParams()
    logits = model.forward([SequenceStep(model.new_cache(), ids)])[0][0]
    raw, sampled = next_token_distributions(logits, sampling, ids)
    k = max(1, min(int(k), logits.shape[0]))
    order = np.lexsort((np.arange(logits.shape[0]), -logits))[:k]  # by logit, ties by id
    tokenizer = model.tokenizer
    candidates = [NextToken(rank=r + 1, token_id=int(t), piece=tokenizer.id_to_token(int(t)), logit=float(logits[t]),
                            probability=float(raw[t]), sampled_probability=float(sampled[t]))
                  for r, t in enumerate(order)]
    return NextTokens(prompt_ids=list(ids), candidates=candidates, sampling=sampling,
                      kept=int(np.count_nonzero(sampled)))
