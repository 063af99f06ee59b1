"""What a request router keys on: a request's prompt as token ids, cut into the prefix cache's blocks.

The prefix cache (engine.runtime.prefix_cache) finds a block by the chain of blocks before it, `block_tokens` token
ids at a time, so a replica can restore a prompt's first k blocks exactly when it served a prompt with the same
first k * block_tokens token ids. A request's routing keys are therefore one digest per full block, each digest
covering the whole prefix up to the end of its block (a chain: digest_i = hash(digest_{i-1}, block_i)); two
requests share their first k keys exactly when they share their first k blocks of token ids (up to a 64-bit hash
collision, which can only misroute a request, never change an answer).

The token ids are the ones the replica's app will compute: the same request models, chat template and tokenizer
(engine.serve.params), run here on a model with its configuration and tokenizer but no weights.
"""
from __future__ import annotations

import logging

from engine.config import ModelConfig
from engine.model import Model
from engine.runtime.prefix_cache import PREFIX_BLOCK_TOKENS
from engine.serve.params import chat_prompt_ids, completion_prompts
from engine.serve.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from engine.serve.tools import tool_calling
from weights.checkpoint import read_json
from weights.hub import resolve_model_folder

log = logging.getLogger("tinyllama.cluster")

PROMPT_ROUTES = {"/v1/chat/completions": (ChatCompletionRequest, "chat"),
                 "/v1/completions": (CompletionRequest, "completion")}


def tokenizer_model(ref: str, revision: str | None = None, chat_template: str | None = None) -> Model:
    """A Model of `ref` with its configuration and tokenizer and no weights (backend None), chatting with
    `chat_template` where given (as the replicas do): enough to turn a request into the prompt token ids a loaded
    replica would compute. CheckpointError for a missing folder or config."""
    folder = resolve_model_folder(ref, revision)
    config = ModelConfig.from_dict(read_json(folder / "config.json"), source=str(folder / "config.json"))
    model = Model(config, None, folder=folder)
    if chat_template is not None:
        model.use_chat_template(chat_template)
    return model


def prompt_ids(model: Model, path: str, raw: bytes) -> list[int] | None:
    """The prompt token ids of an OpenAI request to `path` with body `raw` (what the replica's app will run), or None
    for another route or a request the app will refuse (the app gives the error; the request is routed by load)."""
    route = PROMPT_ROUTES.get(path)
    if route is None:
        return None
    model_class, kind = route
    try:
        body = model_class.model_validate(parse_body(raw))
        if kind == "chat":
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            return chat_prompt_ids(model, body, max_tokens, tool_calling(body))
        return completion_prompts(model, body)[0][0]  # a list of prompts: routed by its first
    except Exception as error:  # noqa: BLE001 - a bad request is the replica's to refuse; here it only has no key
        log.debug("no routing key for a request to %s: %s", path, error)
        return None


def block_digests(token_ids, block_tokens: int = PREFIX_BLOCK_TOKENS) -> tuple[int, ...]:
    """One chained 64-bit digest per full block of `block_tokens` token ids: digest i covers token_ids[:(i + 1) *
    block_tokens]. A partial last block has none (the prefix cache stores only full blocks)."""
    digests = []
    previous = 0
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        previous = hash((previous, tuple(int(t) for t in token_ids[start:start + block_tokens])))
        digests.append(previous)
    return tuple(digests)
