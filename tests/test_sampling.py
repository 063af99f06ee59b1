"""engine.generation.sampling against transformers' own logits processors (the reference semantics)."""

import math
import warnings

import numpy as np
import pytest

from engine.generation.sampling import (
    SamplingError,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_rng,
    probabilities,
    process_logits,
    sample_token,
)

torch = pytest.importorskip("torch", reason="torch is the reference implementation's runtime")
logits_process = pytest.importorskip(
    "transformers.generation.logits_process", reason="transformers provides the reference logits processors"
)

VOCAB = 1000
PREVIOUS_IDS = (5, 17, 17, 3, 999, 5, 250, 4000)  # duplicates, and 4000 is outside the vocab


def _random_row(seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "peaked":
        return (rng.standard_normal(VOCAB) * 6.0).astype(np.float32)
    if kind == "flat":
        return (rng.standard_normal(VOCAB) * 0.05).astype(np.float32)
    if kind == "ties":  # few distinct values: many ties everywhere, including at top-k boundaries
        return rng.integers(-3, 4, VOCAB).astype(np.float32)
    raise ValueError(kind)


ROWS = [(seed, kind) for seed in (0, 1, 2) for kind in ("peaked", "flat", "ties")]


def _softmax64(row) -> np.ndarray:
    row = np.asarray(row, dtype=np.float64)
    exp = np.exp(row - row.max())
    return exp / exp.sum()


def _reference(processor, row: np.ndarray, previous_ids=PREVIOUS_IDS) -> np.ndarray:
    """Run one transformers processor on a (1, vocab) float32 tensor and return the (vocab,) row."""
    input_ids = torch.tensor([list(previous_ids) or [0]], dtype=torch.long)
    scores = torch.from_numpy(row.copy()).unsqueeze(0)
    return processor(input_ids, scores)[0].numpy()


def _assert_same_distribution(ours: np.ndarray, reference: np.ndarray, up_to_ties: bool = False) -> None:
    """Same removed tokens and same softmax (atol 1e-6).

    up_to_ties: top-p sorts with torch's *unstable* sort, so which of several equal logits survive at the
    cut is arbitrary in transformers; then only the multiset of kept values (the sorted distribution) is
    defined, and that is what is compared.
    """
    assert ours.dtype == np.float32
    assert ours.shape == reference.shape
    ours_probs, reference_probs = _softmax64(ours), _softmax64(reference)
    if up_to_ties:
        assert np.isneginf(ours).sum() == np.isneginf(reference).sum(), "different number of tokens removed"
        np.testing.assert_array_equal(np.sort(ours), np.sort(reference))
        np.testing.assert_allclose(np.sort(ours_probs), np.sort(reference_probs), rtol=0, atol=1e-6)
        return
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(reference), err_msg="different tokens removed")
    np.testing.assert_allclose(ours_probs, reference_probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed,kind", ROWS)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_transformers(seed, kind, temperature):
    row = _random_row(seed, kind)
    reference = _reference(logits_process.TemperatureLogitsWarper(temperature), row)
    _assert_same_distribution(apply_temperature(row, temperature), reference)


@pytest.mark.parametrize("seed,kind", ROWS)
@pytest.mark.parametrize("top_k", [1, 2, 7, 50, VOCAB, VOCAB + 25])
def test_top_k_matches_transformers(seed, kind, top_k):
    row = _random_row(seed, kind)
    reference = _reference(logits_process.TopKLogitsWarper(top_k), row)
    _assert_same_distribution(apply_top_k(row, top_k), reference)


def test_top_k_keeps_ties_at_the_boundary():
    row = np.array([3.0, 1.0, 2.0, 2.0, 0.0], dtype=np.float32)
    reference = _reference(logits_process.TopKLogitsWarper(2), row)
    ours = apply_top_k(row, 2)
    _assert_same_distribution(ours, reference)
    assert np.isfinite(ours).tolist() == [True, False, True, True, False]  # 3 tokens kept for k=2


@pytest.mark.parametrize("seed,kind", ROWS)
@pytest.mark.parametrize("top_p", [1e-9, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(seed, kind, top_p):
    row = _random_row(seed, kind)
    reference = _reference(logits_process.TopPLogitsWarper(top_p), row)
    _assert_same_distribution(apply_top_p(row, top_p), reference, up_to_ties=(kind == "ties"))


def test_top_p_keeps_the_token_that_crosses_the_threshold_and_at_least_one():
    row = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    for top_p, expected_kept in [(0.6, [True, True, False]), (0.4, [True, False, False]), (1e-9, [True, False, False])]:
        ours = apply_top_p(row, top_p)
        _assert_same_distribution(ours, _reference(logits_process.TopPLogitsWarper(top_p), row))
        assert np.isfinite(ours).tolist() == expected_kept


@pytest.mark.parametrize("seed,kind", ROWS)
@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.2, 0.9, 1.0])
def test_min_p_matches_transformers(seed, kind, min_p):
    row = _random_row(seed, kind)
    reference = _reference(logits_process.MinPLogitsWarper(min_p), row)
    _assert_same_distribution(apply_min_p(row, min_p), reference)


@pytest.mark.parametrize("seed,kind", ROWS)
@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(seed, kind, penalty):
    row = _random_row(seed, kind)
    reference = _reference(logits_process.RepetitionPenaltyLogitsProcessor(penalty), row)
    ours = apply_repetition_penalty(row, PREVIOUS_IDS, penalty)
    _assert_same_distribution(ours, reference)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=0)  # the scores themselves, not only softmax


def test_processors_return_new_float32_arrays():
    row = _random_row(0, "peaked")
    before = row.copy()
    for processed in (
        apply_repetition_penalty(row, PREVIOUS_IDS, 1.3),
        apply_temperature(row, 0.5),
        apply_top_k(row, 5),
        apply_top_p(row, 0.5),
        apply_min_p(row, 0.1),
    ):
        assert processed.dtype == np.float32 and processed.shape == row.shape
        assert processed is not row
    np.testing.assert_array_equal(row, before)
    assert apply_temperature(row.astype(np.float64), 0.5).dtype == np.float32


@pytest.fixture(scope="module")
def transformers_processor_list():
    """Build transformers' real processor list (its order) via GenerationMixin._get_logits_processor."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )
    model = transformers.LlamaForCausalLM(config)

    def build(params: SamplingParams):
        generation_config = transformers.GenerationConfig(
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else 1.0,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p if params.min_p > 0 else None,
            repetition_penalty=params.repetition_penalty,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "repetition_penalty without input_ids" advice is irrelevant here
            return model._get_logits_processor(generation_config=generation_config, device="cpu")

    return build


COMBINED = [
    SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, top_k=0, top_p=0.8),
    SamplingParams(temperature=1.7, top_k=VOCAB + 1, top_p=0.5, min_p=0.2),
    SamplingParams(temperature=0.4, min_p=0.3, repetition_penalty=0.8),
    SamplingParams(temperature=2.0, top_p=0.95, repetition_penalty=1.1),
]


@pytest.mark.parametrize("seed,kind", ROWS)
@pytest.mark.parametrize("params", COMBINED, ids=lambda p: repr(p))
def test_combined_processing_matches_transformers_pipeline(seed, kind, params, transformers_processor_list):
    row = _random_row(seed, kind)
    processors = transformers_processor_list(params)
    reference = _reference(processors, row)
    ties_decided_by_torch_sort = kind == "ties" and params.top_p < 1.0
    _assert_same_distribution(process_logits(row, params, PREVIOUS_IDS), reference, ties_decided_by_torch_sort)
    probs = probabilities(row, params, PREVIOUS_IDS)
    assert probs.dtype == np.float64 and abs(probs.sum() - 1) < 1e-12
    if ties_decided_by_torch_sort:
        probs, reference_probs = np.sort(probs), np.sort(_softmax64(reference))
    else:
        reference_probs = _softmax64(reference)
    np.testing.assert_allclose(probs, reference_probs, rtol=0, atol=1e-6)


def test_top_p_ties_keep_the_lowest_ids_like_argmax():
    row = np.array([1.0, 2.0, 0.0, 2.0, 2.0], dtype=np.float32)
    assert np.isfinite(apply_top_p(row, 1e-9)).tolist() == [False, True, False, False, False]
    assert np.isfinite(apply_top_p(row, 0.5)).tolist() == [False, True, False, True, False]


def test_transformers_order_is_penalty_temperature_topk_topp_minp(transformers_processor_list):
    processors = transformers_processor_list(COMBINED[0])
    names = [type(processor).__name__ for processor in processors]
    assert names == [
        "RepetitionPenaltyLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
    ]


@pytest.mark.parametrize("seed,kind", ROWS)
def test_greedy_is_argmax_after_repetition_penalty(seed, kind, transformers_processor_list):
    row = _random_row(seed, kind)
    row[5] = row.max() + 0.1  # a previously seen token on top: the penalty may demote it
    rng = make_rng(0)
    plain = SamplingParams()
    penalized = SamplingParams(repetition_penalty=3.0)
    assert sample_token(row, plain, rng) == int(torch.argmax(torch.from_numpy(row)))
    reference = _reference(transformers_processor_list(penalized), row)
    assert sample_token(row, penalized, rng, PREVIOUS_IDS) == int(torch.argmax(torch.from_numpy(reference)))


def test_same_seed_reproduces_the_same_tokens():
    row = _random_row(3, "flat")
    params = SamplingParams(temperature=1.0, top_k=100, seed=1234)
    first = [sample_token(row, params, make_rng(params.seed)) for _ in range(3)]
    rng_a, rng_b = make_rng(params.seed), make_rng(params.seed)
    draws_a = [sample_token(row, params, rng_a) for _ in range(50)]
    draws_b = [sample_token(row, params, rng_b) for _ in range(50)]
    assert draws_a == draws_b
    assert len(set(first)) == 1
    assert draws_a != [sample_token(row, params, make_rng(99)) for _ in range(50)]


def test_samples_follow_the_processed_distribution():
    row = _random_row(4, "peaked")[:20].copy()
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.95)
    probs = probabilities(row, params)
    rng = make_rng(7)
    draws = np.array([sample_token(row, params, rng) for _ in range(6000)])
    counts = np.bincount(draws, minlength=row.shape[0])
    assert np.all(counts[probs == 0] == 0), "sampled a removed token"
    # each frequency within 5 standard errors of its probability
    standard_error = np.sqrt(probs * (1 - probs) / draws.size)
    assert np.all(np.abs(counts / draws.size - probs) <= 5 * standard_error + 1e-12)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"seed": "42"}, "seed"),
    ],
)
def test_invalid_params_raise_one_line_sampling_error(kwargs, field):
    with pytest.raises(SamplingError) as error:
        SamplingParams(**kwargs)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert field in message and "\n" not in message
    assert repr(next(iter(kwargs.values()))) in message


def test_greedy_property():
    assert SamplingParams().greedy
    assert SamplingParams(temperature=0.0, top_k=5).greedy
    assert not SamplingParams(temperature=0.5).greedy
