"""Text in, text out: stop conditions, streaming, sampling controls and batching, on stories260K (real text) and on a
random model carrying TinyLlama's real tokenizer."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import ContextOverflowError, EngineError
from engine.generation.state import default_options

STORY = ", there was a little girl named Lily"


@pytest.fixture(scope="module")
def stories(stories260k):
    return engine.load_model(str(stories260k))


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return engine.load_model(str(tiny_chat_model))


def test_greedy_text_continues_the_story(stories):
    result = stories.complete("Once upon a time", max_new_tokens=40)
    assert result.text.startswith(STORY)
    assert result.stop_reason == "max_new_tokens" and len(result.token_ids) == 40
    assert result.prompt_token_ids == [1, 403, 407, 261, 378]
    # the text is what the new tokens add to the prompt's text
    tok = stories.tokenizer
    full = tok.decode(result.prompt_token_ids + result.token_ids, skip_special_tokens=True)
    assert full == tok.decode(result.prompt_token_ids, skip_special_tokens=True) + result.text


def test_stream_pieces_concatenate_to_the_result(tiny):
    gen = tiny.stream("Write a poem about 🚀 and 東京:", temperature=1.0, seed=5, max_new_tokens=60, ignore_eos=True)
    pieces = [event.text for event in gen]
    assert len(pieces) == 60 and sum(1 for p in pieces if p) > 10
    tok = tiny.tokenizer
    ids = gen.result.prompt_token_ids + gen.result.token_ids
    expected = tok.decode(ids, skip_special_tokens=True)[len(tok.decode(gen.result.prompt_token_ids, skip_special_tokens=True)):]
    assert "".join(pieces) == gen.result.text == expected


def test_stop_on_eos_from_options(stories):
    plain = stories.generate("Once upon a time", max_new_tokens=30)
    stop_token = plain[6]
    first = plain.index(stop_token)
    result = stories.complete("Once upon a time", max_new_tokens=30, eos_ids=(stop_token,))
    assert result.stop_reason == "eos" and result.token_ids == plain[: first + 1]


def test_stop_on_config_eos(tiny, tiny_chat_model):
    """The model's own EOS (config/generation_config/tokenizer: </s> = 2) stops generation when it is sampled."""
    from engine.generation.state import eos_ids_of

    fresh = engine.load_model(str(tiny_chat_model))  # tokenizer not loaded yet: its EOS ids must join all the same
    fresh.config = fresh.config.__class__(**{**fresh.config.__dict__, "eos_token_ids": ()})
    fresh.generation_config = {}
    assert eos_ids_of(fresh) == (2,)  # from the tokenizer alone
    assert 2 in eos_ids_of(tiny)
    plain = tiny.generate([1, 450, 29871], max_new_tokens=20, ignore_eos=True)
    result = tiny.complete([1, 450, 29871], max_new_tokens=20, eos_ids=(plain[3],))
    assert result.stop_reason == "eos" and result.token_ids[-1] == plain[3]


@pytest.mark.parametrize("stop", ["little girl", "le gi", "Lily."])
def test_stop_strings_across_token_boundaries(stories, stop):
    full = stories.complete("Once upon a time", max_new_tokens=40)
    result = stories.complete("Once upon a time", max_new_tokens=40, stop=[stop, "never appears"])
    assert result.stop_reason == "stop_string"
    assert result.text == full.text[: full.text.index(stop)]
    assert stop not in result.text
    streamed = "".join(e.text for e in stories.stream("Once upon a time", max_new_tokens=40, stop=stop))
    assert streamed == result.text


def test_context_full_stops_generation(stories):
    window = stories.config.max_position_embeddings  # 512
    prompt = [1] + [403, 407, 261, 378] * 124  # 497 tokens
    result = stories.complete(prompt, max_new_tokens=100)
    assert result.stop_reason == "context_full"
    assert len(prompt) + len(result.token_ids) == window + 1  # the last token is sampled but never fed


def test_prompt_longer_than_window_is_refused_or_truncated(stories):
    prompt = [1] + [403] * 600
    with pytest.raises(ContextOverflowError, match="context window is 512"):
        stories.complete(prompt, max_new_tokens=5)
    result = stories.complete(prompt, max_new_tokens=5, truncate=True)
    # The one truncation rule (API and CLI): keep room for the requested new tokens.
    assert result.prompt_token_ids == prompt[-(512 - 5):]
    assert result.stop_reason == "max_new_tokens" and len(result.token_ids) == 5
    fits = [1] + [403] * 500  # fits the window, but not with 20 new tokens: cut to 492 tokens
    assert stories.complete(fits, max_new_tokens=20, truncate=True).prompt_token_ids == fits[-492:]
    assert stories.complete(fits, max_new_tokens=5, truncate=True).prompt_token_ids == fits  # room enough: kept
    assert stories.complete(fits, max_new_tokens=5000, truncate=True).prompt_token_ids == fits[-1:]


def test_seeded_sampling_is_reproducible(tiny):
    a = tiny.generate("Hello", temperature=0.9, top_p=0.95, top_k=50, seed=123, max_new_tokens=20, ignore_eos=True)
    b = tiny.generate("Hello", temperature=0.9, top_p=0.95, top_k=50, seed=123, max_new_tokens=20, ignore_eos=True)
    c = tiny.generate("Hello", temperature=0.9, top_p=0.95, top_k=50, seed=124, max_new_tokens=20, ignore_eos=True)
    assert a == b and a != c


def test_sampled_tokens_follow_the_processed_distribution(stories):
    """Frequencies of the first sampled token match the processed distribution (temperature, top-k, top-p)."""
    from engine.generation.sampling import SamplingParams, probabilities

    params = dict(temperature=1.3, top_k=20, top_p=0.9)
    expected = probabilities(stories.logits([1, 403, 407])[-1], SamplingParams(**params))
    counts = np.zeros_like(expected)
    for seed in range(400):
        counts[stories.generate([1, 403, 407], max_new_tokens=1, seed=seed, **params)[0]] += 1
    assert set(np.nonzero(counts)[0]) <= set(np.nonzero(expected)[0])
    assert np.abs(counts / 400 - expected).max() < 0.08


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(min_p=2.0), dict(repetition_penalty=0.0), dict(max_new_tokens=0)])
def test_invalid_options_are_refused(stories, bad):
    with pytest.raises(EngineError):
        stories.complete([1, 403], **bad)


def test_defaults_come_from_generation_config(stories):
    stories.generation_config = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "eos_token_id": [2, 5]}
    try:
        opts = default_options(stories)
        assert (opts.sampling.temperature, opts.sampling.top_p) == (0.7, 0.8)
        assert default_options(stories, temperature=0.0).sampling.greedy
        from engine.generation.state import eos_ids_of

        assert set(eos_ids_of(stories)) >= {2, 5}
    finally:
        stories.generation_config = {"bos_token_id": 1, "eos_token_id": 2}


def test_generate_batch_equals_each_prompt_alone(stories):
    prompts = ["Once upon a time", "The dog", "Lily and Tom went to the park. They saw a"]
    batch = stories.generate_batch(prompts, max_new_tokens=24, stop=["park"])
    for prompt, got in zip(prompts, batch):
        alone = stories.complete(prompt, max_new_tokens=24, stop=["park"])
        assert got.token_ids == alone.token_ids and got.text == alone.text and got.stop_reason == alone.stop_reason
