"""GGUF files made by llama.cpp's own converter (convert_hf_to_gguf.py from the llama-cpp-python source) and
quantizer (llama_model_quantize), and llama.cpp itself as the second reference: the converter's F32 file gives the
safetensors run's logits (its q_proj / k_proj row permutation undone exactly), our tokenizer gives llama.cpp's own
ids on the same file, and on Q8_0 / Q4_0 files our drift from the file's exact meaning is at most half of llama.cpp's.
Skipped, with the reason, where llama-cpp-python is not installed (tests/test_gguf.py runs without it)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf")
from bench import llamacpp as bench_llamacpp  # noqa: E402

if not bench_llamacpp.installed():
    pytest.skip("llama-cpp-python is not installed: llama.cpp's converter, quantizer and tokenizer are its parts "
                "(tests/test_gguf.py covers GGUF files without it)", allow_module_level=True)

import engine  # noqa: E402
from engine import llamacpp  # noqa: E402
from engine.compare import compare_with_transformers  # noqa: E402
from tests.conftest import REPO, make_random_checkpoint  # noqa: E402
from tests.test_gguf import CORPUS  # noqa: E402

IDS = [1, 403, 407, 261, 378, 432, 20, 50, 100, 7, 300]


def converted(folder, outtype: str):
    try:
        return bench_llamacpp.gguf_for(folder, outtype)
    except Exception as e:  # noqa: BLE001 - the converter could not be fetched or run: say why
        pytest.skip(f"llama.cpp's converter / quantizer could not make the {outtype} file: {e}")


def test_converter_f32_file_equals_the_safetensors_run(stories260k):
    path = converted(stories260k, "f32")
    ours, folder = engine.load_model(str(path)), engine.load_model(str(stories260k))
    a, b = ours.logits(IDS), folder.logits(IDS)
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b))
    assert ours.generate([1], max_new_tokens=16) == folder.generate([1], max_new_tokens=16)


@pytest.fixture(scope="module")
def tinyllama_vocab_file(tmp_path_factory, tinyllama_tokenizer_dir):
    """A tiny random Llama with TinyLlama's real vocabulary (tokenizer.model: the SentencePiece scores), converted by
    llama.cpp's converter."""
    pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("tinyllama-vocab")
    make_random_checkpoint(folder, tokenizer_from=tinyllama_tokenizer_dir, vocab_size=32000, hidden_size=64,
                           intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, seed=11)
    (folder / "tokenizer.model").symlink_to(tinyllama_tokenizer_dir / "tokenizer.model")
    return converted(folder, "f16")


def test_tokenizer_ids_equal_llama_cpps_own(tinyllama_vocab_file):
    model = engine.load_model(str(tinyllama_vocab_file))
    with llamacpp.LlamaCpp(tinyllama_vocab_file, vocab_only=True) as lc:
        for text in CORPUS:
            assert model.tokenizer.encode(text) == lc.tokenize(text), text
    assert model.tokenizer.chat_template and model.tokenizer.eos_ids == (2,)


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0", "q4_K_M"])
def test_half_of_llama_cpps_drift_from_the_files_exact_meaning(stories260k, outtype):
    """stories260K's own llama.cpp files, 512 tokens of text plus a prompt's greedy path: our mean KL against the file's
    exact meaning <= 0.5x llama.cpp's on the same file and rows, our top-1 agreement >= llama.cpp's."""
    path = converted(stories260k, outtype)
    try:
        model = engine.load_model(str(path))
    except engine.CheckpointError as e:
        pytest.skip(f"{outtype}: {e}")  # a tensor in a type another engineer's formats add (Q6_K, Q5_0, ...)
    text = (REPO / "bench" / "texts" / "story.txt").read_text(encoding="utf-8")
    report = compare_with_transformers(model, "Once upon a time", steps=16, text=text, text_source="story.txt")
    ours, theirs = report.fidelity, report.llamacpp.fidelity
    assert ours.kl_mean <= 0.5 * theirs.kl_mean, (ours, theirs)
    assert ours.top1_agreement >= theirs.top1_agreement
    assert "llama.cpp" in report.summary()


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smollm", "default"])
def test_byte_level_bpe_ids_equal_llama_cpps_own(tmp_path, pre):
    """A byte-level BPE vocabulary ("gpt2": tokens and merges) with GPT-2's and Llama 3's pre-tokenizers: our ids
    are llama.cpp's on the same file."""
    from tests.gguf_support import trained_byte_level_bpe, write_gguf

    _, vocab = trained_byte_level_bpe()
    folder = make_random_checkpoint(tmp_path / "ckpt", vocab_size=len(vocab["tokens"]), seed=5)
    path = write_gguf(folder, tmp_path / f"bpe-{pre}.gguf", "F32", bpe=dict(vocab, pre=pre))
    model = engine.load_model(str(path))
    with llamacpp.LlamaCpp(path, vocab_only=True) as lc:
        for text in CORPUS + ["<|begin_of_text|>Hello<|end_of_text|> it's 1234567"]:
            assert model.tokenizer.encode(text) == lc.tokenize(text), (pre, text)
