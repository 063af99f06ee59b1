"""Prompt-lookup drafting: propose the tokens that followed the latest earlier occurrence of the context's last n-gram."""
from __future__ import annotations


def prompt_lookup_draft(context: list[int], max_draft: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to `max_draft` draft tokens for `context` (prompt + generated ids), [] when no n-gram recurs.

    Tries the longest suffix n-gram first (max_ngram down to min_ngram) and the most recent earlier match.
    """
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        suffix = context[n_ctx - n:]
        for start in range(n_ctx - n - 1, -1, -1):
            if context[start:start + n] == suffix:
                follow = context[start + n:start + n + max_draft]
                if follow:
                    return follow
    return []
