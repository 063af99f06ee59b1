"""`POST /v1/embeddings` (and `/embeddings`): OpenAI's embeddings API over engine.inspect.embeddings.

`input` is a string, a list of strings, a list of token ids or a list of such lists (text is tokenized with BOS, as
/v1/completions does; ids are taken as given); each input is one vector, pooled from the last hidden state as the
server's `--pooling` says (mean by default, or last) and normalized to unit length (vLLM's `normalize: false` turns
that off). `encoding_format` "float" gives JSON numbers, "base64" the float32 little-endian bytes in base64 (what the
`openai` client asks for and decodes by default). `dimensions` is accepted only as the model's own width (no
truncation). Each input runs on the serving thread in slices between batched steps (a SlicedEmbedding through
`ServingLoop.submit_work`, as the inspections do), one input at a time per server, so neither a long input nor a long
list stalls the streams; a client that leaves cancels its input before its next slice.

`compute_embeddings(state, inputs, normalize)` is the one entry point other protocol faces use (Ollama's
/api/embed): token-id lists in, a (n, hidden) float32 array out.
"""
from __future__ import annotations

import asyncio
import base64
from typing import Literal, Union

import numpy as np
from fastapi import FastAPI, Request
from pydantic import Field

from engine.errors import EngineError
from engine.inspect.embeddings import SlicedEmbedding
from engine.serve.errors import bad_request
from engine.serve.inspect_routes import run_sliced
from engine.serve.protocol import _Body

MAX_INPUTS = 2048  # OpenAI's own limit on the inputs of one request
EMBEDDINGS_AT_ONCE = 1  # inputs embedded at once (each holds its KV cache and states): the others wait their turn


class EmbeddingRequest(_Body):
    """POST /v1/embeddings (OpenAI's fields; `normalize` is vLLM's extension)."""

    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    normalize: bool | None = True


def embedding_inputs(model, body: EmbeddingRequest) -> list[list[int]]:
    """The request's inputs as token-id lists; 400 naming the field for an empty input, an id outside the
    vocabulary, an input longer than the window, too many inputs, or `dimensions` other than the model's width."""
    hidden = model.config.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise bad_request(f"dimensions: this model's embeddings have {hidden} dimensions (no other size is "
                          f"supported), got {body.dimensions}", "dimensions")
    raw = body.input
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise bad_request("input: give at least one input", "input")
    if len(raw) > MAX_INPUTS:
        raise bad_request(f"input: at most {MAX_INPUTS} inputs per request, got {len(raw)}", "input")
    config, tokenizer = model.config, model.tokenizer
    inputs = []
    for i, item in enumerate(raw):
        param = "input" if len(raw) == 1 else f"input[{i}]"
        if not item:
            raise bad_request(f"{param}: an input cannot be empty", param)
        ids = tokenizer.encode(item, threaded=True) if isinstance(item, str) else list(item)
        if any(not 0 <= t < config.vocab_size for t in ids):
            raise bad_request(f"{param}: token ids must be in 0..{config.vocab_size - 1}", param)
        if len(ids) > config.max_position_embeddings:
            raise bad_request(f"{param}: {len(ids)} tokens, more than this model's context window of "
                              f"{config.max_position_embeddings}", param, "context_length_exceeded")
        inputs.append(ids)
    return inputs


async def compute_embeddings(state, inputs: list[list[int]], normalize: bool = True, request: Request | None = None
                             ) -> np.ndarray:
    """Embed each token-id list on the serving thread, pooled as the server's `pooling` says -> (n, hidden) float32.

    `state`: the app's ServerState (ready; add_embedding_routes gave it `embedding_turns`); inputs already checked
    (embedding_inputs does it for OpenAI's bodies). Each input is a SlicedEmbedding run between batched steps, one
    at a time per server; `request`'s client leaving cancels it (ClientGone); 503 when the server is stopping."""
    model, pooling = state.model, state.pooling
    vectors = []
    for ids in inputs:
        async with state.embedding_turns:
            try:
                job = SlicedEmbedding(model, ids, pooling, normalize)
            except EngineError as e:  # another backend than NumPy's, say
                raise bad_request(str(e)) from None
            vectors.append(await run_sliced(request, state, job, "embedding"))
    return np.stack(vectors) if vectors else np.zeros((0, model.config.hidden_size), np.float32)


def encode_vector(vector: np.ndarray, encoding_format: str):
    """One embedding as the response carries it: a list of floats, or base64 of its float32 little-endian bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def add_embedding_routes(app: FastAPI, state, prepare) -> None:
    """Mount POST /v1/embeddings and /embeddings. `prepare(request, body_class)`: the app's authorize + parse +
    validate + model and readiness check."""
    state.embedding_turns = asyncio.Semaphore(EMBEDDINGS_AT_ONCE)  # shared with the other faces' embeddings

    async def embeddings(request: Request):
        body = await prepare(request, EmbeddingRequest)
        inputs = await asyncio.to_thread(embedding_inputs, state.model, body)
        vectors = await compute_embeddings(state, inputs, normalize=body.normalize is not False, request=request)
        tokens = sum(len(ids) for ids in inputs)
        fmt = body.encoding_format or "float"
        return {"object": "list", "model": body.model or state.served_model_name,
                "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    for path in ("/v1/embeddings", "/embeddings"):
        app.add_api_route(path, embeddings, methods=["POST"])
