"""engine.inspect against references: token pieces against transformers' tokenizer, next-token probabilities against
transformers' softmax and logits warpers, perplexity against transformers' loss (and a hand-made sliding window on
its logits), the logit lens against transformers' own norm and lm_head, neighbours against a float64 cosine, head
summaries against float64 sums over transformers' attentions."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import EngineError
from engine.generation.sampling import SamplingParams
from engine.inspect.attention import AttentionInspection, head_summary, summarise_heads
from engine.inspect.lens import lens_logits, logit_lens
from engine.inspect.sliced import SLICE_ALIGN
from engine.inspect.neighbours import nearest_tokens, token_for_word
from engine.inspect.next_token import next_tokens
from engine.inspect.perplexity import perplexity, sliding_windows
from engine.inspect.tokens import token_rows
from engine.text.tokenizer import Tokenizer
from tests.conftest import load_reference, make_random_checkpoint

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she "
         "saw a big, red ball. She wanted to play with it, but it was too high.")
TRICKY = "Hello\n world 🙂 naïve 1024  spaces\tand tabs"


@pytest.fixture(scope="module")
def stories(stories260k):
    return engine.load_model(str(stories260k)), load_reference(stories260k)


@pytest.fixture(scope="module")
def untied(tmp_path_factory, stories260k):
    """A random untied GQA model (final norm and lm_head distinct from the embeddings), stories260K's tokenizer."""
    folder = make_random_checkpoint(tmp_path_factory.mktemp("untied"), num_hidden_layers=3, num_attention_heads=8,
                                    num_key_value_heads=2, vocab_size=512, seed=31, tokenizer_from=stories260k)
    return engine.load_model(str(folder)), load_reference(folder)


def torch_forward(ref, ids, **kwargs):
    import torch

    with torch.no_grad():
        return ref(torch.tensor([list(ids)]), **kwargs)


# --- tokens ----------------------------------------------------------------------------------------------------

def test_token_pieces_equal_transformers_convert_ids_to_tokens(tinyllama_tokenizer_dir):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_folder(tinyllama_tokenizer_dir)
    theirs = AutoTokenizer.from_pretrained(tinyllama_tokenizer_dir)
    ids = ours.encode(TRICKY)
    rows = token_rows(ours, ids)
    assert [r.piece for r in rows] == theirs.convert_ids_to_tokens(ids)
    assert [r.index for r in rows] == list(range(len(ids))) and [r.token_id for r in rows] == ids
    assert "<0x0A>" in [r.piece for r in rows] and "<0xF0>" in [r.piece for r in rows]
    assert [r.special for r in rows] == [True] + [False] * (len(ids) - 1)
    # the bytes of the tokens are the text (SentencePiece prepends one space, decoding strips it)
    assert b"".join(r.bytes for r in rows[1:]) == b" " + TRICKY.encode("utf-8")
    emoji = [r for r in rows if r.piece.startswith("<0xF")]
    assert emoji[0].text is None and emoji[0].to_json()["bytes"] == [0xF0]
    # special tokens written in the text are marked, and the bytes are what decoding gives
    ids = ours.encode("one</s> two<s>")
    rows = token_rows(ours, ids)
    assert [r.piece for r in rows] == theirs.convert_ids_to_tokens(ids)
    assert [r.special for r in rows] == [i in (1, 2) for i in ids] and sum(r.special for r in rows) == 3
    assert b"".join(r.bytes for r in rows[1:]) == b" " + ours.decode(ids[1:]).encode("utf-8")


def test_token_bytes_of_a_byte_level_bpe_tokenizer(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["hello world", "naïve café 🙂 hello"], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_folder(tmp_path)
    text = "hello naïve 🙂\nworld"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8") == tok.decode(ids).encode("utf-8")


# --- next ------------------------------------------------------------------------------------------------------

def test_next_token_probabilities_equal_transformers(stories):
    import torch
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    model, ref = stories
    ids = model.tokenizer.encode("Once upon a time, there was a little")
    logits = torch_forward(ref, ids).logits[:, -1]  # (1, vocab)
    raw = torch.softmax(logits.double(), dim=-1)[0].numpy()

    greedy = next_tokens(model, ids, k=8)
    assert [c.token_id for c in greedy.candidates] == torch.argsort(logits[0], descending=True)[:8].tolist()
    for c in greedy.candidates:
        assert abs(c.probability - raw[c.token_id]) < 1e-5
        assert abs(c.logit - float(logits[0, c.token_id])) < 1e-4
    assert greedy.kept == 1 and greedy.candidates[0].sampled_probability == 1.0

    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3)
    sampled = next_tokens(model, ids, k=20, sampling=params)
    processed = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids]), logits.clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9), MinPLogitsWarper(0.02)):
        processed = warper(torch.tensor([ids]), processed)
    expected = torch.softmax(processed.double(), dim=-1)[0].numpy()
    assert sampled.kept == int(np.count_nonzero(expected)) and 1 < sampled.kept < 40
    for c in sampled.candidates:
        assert abs(c.sampled_probability - expected[c.token_id]) < 1e-5


# --- perplexity ------------------------------------------------------------------------------------------------

def test_perplexity_equals_exp_of_transformers_loss(stories):
    model, ref = stories
    ids = model.tokenizer.encode(STORY)
    result = perplexity(model, STORY, progress=False)
    out = torch_forward(ref, ids, labels=__import__("torch").tensor([ids]))
    assert len(result.windows) == 1 and result.scored.all() and result.nll.size == len(ids) - 1
    assert abs(result.mean_nll - float(out.loss)) < 1e-5
    assert abs(result.perplexity - float(np.exp(float(out.loss)))) / result.perplexity < 1e-5
    log_probs = np.log(np.exp(out.logits[0].double().numpy()) / np.exp(out.logits[0].double().numpy()).sum(-1,
                                                                                                     keepdims=True))
    per_token = -log_probs[np.arange(len(ids) - 1), ids[1:]]
    assert np.max(np.abs(result.nll - per_token)) < 1e-4
    worst = result.worst(3)
    assert worst == [int(j) + 1 for j in np.argsort(-per_token, kind="stable")[:3]]


def hand_sliding_window_nll(ref, ids, window, stride) -> tuple[list[float], list[int]]:
    """The guide's windows by hand on transformers' logits: each token after the first scored once, in the first
    window whose targets reach it, predicted from that window's tokens before it."""
    nll, scored, previous_end = [], [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        logits = torch_forward(ref, ids[begin:end]).logits[0].double().numpy()
        for j in range(max(previous_end, begin + 1), end):
            row = logits[j - 1 - begin]
            nll.append(float(np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[j]]))
            scored.append(j)
        previous_end = end
        if end == len(ids):
            break
    return nll, scored


@pytest.mark.parametrize("window,stride", [(16, 8), (20, 7), (12, 12)])
def test_sliding_window_perplexity_equals_a_hand_computation(stories, window, stride):
    model, ref = stories
    ids = model.tokenizer.encode(STORY)
    result = perplexity(model, ids, window=window, stride=stride, progress=False)
    nll, scored = hand_sliding_window_nll(ref, ids, window, stride)
    assert np.flatnonzero(result.scored).tolist() == [j - 1 for j in scored]
    assert np.max(np.abs(result.nll[result.scored] - np.array(nll))) < 1e-4
    assert abs(result.perplexity - float(np.exp(np.mean(nll)))) / result.perplexity < 1e-5
    assert len(result.windows) > 2 and result.windows[-1].end == len(ids)


def test_sliding_windows_score_every_token_once():
    assert [(w.begin, w.end, w.scored_from) for w in sliding_windows(10, 4, 2)] == [
        (0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert [(w.begin, w.end, w.scored_from) for w in sliding_windows(10, 4, 4)] == [
        (0, 4, 1), (4, 8, 5), (8, 10, 9)]  # no overlap: each window's first token has nothing to predict it
    assert [(w.begin, w.end, w.scored_from) for w in sliding_windows(5, 8, 4)] == [(0, 5, 1)]


def test_perplexity_errors(stories):
    model, _ = stories
    with pytest.raises(EngineError, match="at least 2 tokens"):
        perplexity(model, [1], progress=False)
    with pytest.raises(EngineError, match="window"):
        perplexity(model, STORY, window=10_000, progress=False)
    with pytest.raises(EngineError, match="stride"):
        perplexity(model, STORY, window=8, stride=0, progress=False)


# --- the logit lens --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["stories", "untied"])
def test_lens_rows_equal_transformers_norm_and_lm_head(which, request):
    import torch

    model, ref = request.getfixturevalue(which)
    ids = model.tokenizer.encode(STORY)[:20] if which == "stories" else [1, 5, 9, 77, 3, 120, 43, 250, 8, 17]
    lens = logit_lens(model, ids)
    out = torch_forward(ref, ids, output_hidden_states=True)
    n = len(out.hidden_states)
    assert lens.top_ids.shape == (n, len(ids)) == lens.top_probs.shape and lens.next_probs.shape == (n, len(ids) - 1)
    trace = model.trace(ids, hidden_states=True)
    for i, h in enumerate(out.hidden_states):
        with torch.no_grad():
            expected = (ref.lm_head(ref.model.norm(h)) if i < n - 1 else out.logits)[0].double()
        probs = torch.softmax(expected, dim=-1).numpy()
        ours = lens_logits(model, trace, i)
        assert np.max(np.abs(ours - expected.numpy())) / np.max(np.abs(expected.numpy())) < 1e-4
        assert lens.top_ids[i].tolist() == probs.argmax(axis=1).tolist()
        assert np.max(np.abs(lens.top_probs[i] - probs.max(axis=1))) < 1e-5
        assert np.max(np.abs(lens.next_probs[i] - probs[np.arange(len(ids) - 1), ids[1:]])) < 1e-5
    assert lens.top_ids[-1].tolist() == out.logits[0].argmax(-1).tolist()  # the last row is the model's output
    assert lens.row_labels[0] == "embeddings" and lens.row_labels[-1] == f"layer {n - 2}"


# --- neighbours ------------------------------------------------------------------------------------------------

def float64_neighbours(matrix: np.ndarray, token_id: int, k: int):
    e = matrix.astype(np.float64)
    cos = e @ e[token_id] / (np.linalg.norm(e, axis=1) * np.linalg.norm(e[token_id]))
    cos[token_id] = -np.inf
    order = np.argsort(-cos, kind="stable")[:k]
    return order.tolist(), cos[order]


def test_neighbours_equal_a_float64_cosine(stories, untied):
    model, ref = stories
    lily = token_for_word(model, "Lily")
    assert model.tokenizer.id_to_token(lily) == "▁Lily"
    ids, cos = float64_neighbours(ref.model.embed_tokens.weight.detach().numpy(), lily, 12)
    found = nearest_tokens(model, lily, k=12)
    assert [n.token_id for n in found] == ids and [n.rank for n in found] == list(range(1, 13))
    assert np.max(np.abs(np.array([n.cosine for n in found]) - cos)) < 1e-6
    assert found[0].piece == model.tokenizer.id_to_token(ids[0])
    model, ref = untied
    ids, cos = float64_neighbours(ref.lm_head.weight.detach().numpy(), 7, 5)
    found = nearest_tokens(model, 7, k=5, matrix="lm_head")
    assert [n.token_id for n in found] == ids and np.max(np.abs(np.array([n.cosine for n in found]) - cos)) < 1e-6


def test_words_that_are_not_one_token(stories, tiny_chat_model):
    model, _ = stories
    assert token_for_word(model, "▁Lily") == token_for_word(model, "Lily")  # a vocabulary piece works too
    with pytest.raises(EngineError, match="tokens"):
        token_for_word(model, "Lily played")
    with pytest.raises(EngineError, match="outside the vocabulary"):
        nearest_tokens(model, 10_000)
    chat = engine.load_model(str(tiny_chat_model))
    assert chat.tokenizer.id_to_token(token_for_word(chat, "Paris")) == "▁Paris"  # TinyLlama's real tokenizer


# --- attention summaries ---------------------------------------------------------------------------------------

def test_head_summaries_equal_float64_sums_over_transformers_attentions(stories):
    model, ref = stories
    ids = model.tokenizer.encode(STORY)[:24]
    attentions = [a[0].double().numpy() for a in torch_forward(ref, ids, output_attentions=True).attentions]
    summary = head_summary(model, ids)
    smallest_slices = AttentionInspection(model, ids).bytes_needed  # the least memory it runs in: 4 rows a slice
    assert AttentionInspection(model, ids, max_bytes=smallest_slices).max_rows == SLICE_ALIGN == 4
    slice_by_slice = head_summary(model, ids, max_bytes=smallest_slices)
    with pytest.raises(EngineError, match="limit"):
        head_summary(model, ids, max_bytes=smallest_slices - 1)
    for i, a in enumerate(attentions):
        q = np.arange(1, len(ids))
        to_first = a[:, 1:, 0].mean(axis=1)
        to_previous = a[:, q, q - 1].mean(axis=1)
        entropy = np.array([np.mean([-sum(p * np.log(p) for p in row if p > 0) for row in head[1:]]) for head in a])
        assert np.max(np.abs(summary.to_first[i] - to_first)) < 1e-5
        assert np.max(np.abs(summary.to_previous[i] - to_previous)) < 1e-5
        assert np.max(np.abs(summary.entropy[i] - entropy)) < 1e-4
        assert np.allclose(summarise_heads(a.astype(np.float32))[2], entropy, atol=1e-4)
    for name in ("to_first", "to_previous", "entropy"):  # a row's numbers do not depend on the slicing
        assert np.array_equal(getattr(slice_by_slice, name), getattr(summary, name))
