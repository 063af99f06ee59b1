"""The llama.cpp runner the README's comparisons rest on computes the same model: on an f32 GGUF of a checkpoint
(converted by bench.llamacpp, as `tinyllama bench` does), its greedy tokens equal this engine's, prefill and batched
decode alike. Skipped where llama-cpp-python is not installed (as in CI)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from bench import llamacpp
from bench.systems import EngineRunner, LlamaCppRunner

pytestmark = pytest.mark.skipif(not llamacpp.installed(),
                                reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
STEPS = 12
BATCH = 3


@pytest.fixture(scope="module")
def f32_gguf_checkpoint(tiny_chat_model, tmp_path_factory):
    """The random tiny Llama with TinyLlama's tokenizer, and its f32 GGUF written under a temporary bench cache."""
    if importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("llama.cpp's converter needs sentencepiece for TinyLlama's tokenizer (pip install sentencepiece)")
    try:
        script = llamacpp.converter()  # the llama-cpp-python source of the installed version, cached once
    except Exception as e:  # noqa: BLE001 - offline without a cached converter: nothing to convert with
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py is not available here: {e}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLLAMA_GGUF_CONVERTER", str(script))
        mp.setenv("TINYLLAMA_BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))  # the GGUF goes there, not ~/.cache
        yield tiny_chat_model, llamacpp.gguf_for(tiny_chat_model, "f32")


def greedy_run(runner, prompt):
    """(prefill's first token, per decode step the tokens of a batch of BATCH copies of the prompt)."""
    runner.room = len(prompt) + STEPS + 8
    first = runner.prefill(prompt)
    runner.decode_setup(BATCH, prompt)
    steps = [list(runner.next_tokens)]
    for _ in range(STEPS):
        runner.decode_step()
        steps.append([int(t) for t in np.asarray(runner.next_tokens).reshape(-1)])
    return first, steps


def test_llamacpp_f32_greedy_tokens_equal_the_engine(f32_gguf_checkpoint):
    folder, gguf = f32_gguf_checkpoint
    theirs = LlamaCppRunner(str(folder), "f32", threads=1)
    theirs.prepare()
    assert theirs.gguf == gguf
    theirs.load()
    ours = EngineRunner(str(folder), "numpy")
    ours.load()
    assert theirs.weight_bytes == pytest.approx(ours.weight_bytes, rel=0.01)  # f32 both: the same bytes
    assert theirs.decode_bytes == pytest.approx(ours.decode_bytes, rel=0.01)  # untied: both leave the table out
    prompt = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889]
    first_ours, steps_ours = greedy_run(ours, prompt)
    first_theirs, steps_theirs = greedy_run(theirs, prompt)
    assert first_theirs == first_ours
    assert steps_theirs == steps_ours
    tokens = [step[0] for step in steps_ours]
    assert len(set(tokens)) > 3 and all(len(set(step)) == 1 for step in steps_ours)  # a real continuation, batched
