"""GGUF files (llama.cpp's format) run by this engine: the same logits and tokens as the same checkpoint's
safetensors run for the float types, the file's exact meaning (its tensors dequantized by gguf-py, run in float64)
within the int16-activation bound for Q8_0 / Q4_0, the tokenizer from the file alone, the repacked weights cached,
every bad file one clear error. Files are written with gguf-py's GGUFWriter here (tests/gguf_support.py: always
runs); those made by llama.cpp's own converter and quantizer are in tests/test_gguf_llamacpp.py."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

import engine  # noqa: E402
from engine.runtime import ggml_formats, quant_cache  # noqa: E402
from engine.runtime.quant import QuantMatrix  # noqa: E402
from tests.conftest import LOAD_PROBE, REPO, make_random_checkpoint  # noqa: E402
from tests.gguf_support import copy_with, write_gguf  # noqa: E402
from tests.test_quant import kernel_bound  # noqa: E402
from weights import CheckpointError  # noqa: E402

IDS = [1, 17, 200, 31, 5, 99, 120, 7, 64, 3, 250, 11]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, stories260k):
    """Random Llamas (GQA, untied) stored as float32, float16 and bfloat16, with stories260K's tokenizer."""
    root = tmp_path_factory.mktemp("gguf-ckpt")
    return {dtype: make_random_checkpoint(root / dtype, dtype=dtype, tokenizer_from=stories260k, seed=3)
            for dtype in ("float32", "float16", "bfloat16")}


@pytest.mark.parametrize("dtype,type_name", [("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16")])
def test_float_types_equal_the_safetensors_run(checkpoints, tmp_path, dtype, type_name):
    folder = checkpoints[dtype]
    path = write_gguf(folder, tmp_path / f"m-{type_name}.gguf", type_name)
    ours = engine.load_model(str(path))
    theirs = engine.load_model(str(folder))
    assert ours.weights_dtype == theirs.weights_dtype == dtype
    a, b = ours.logits(IDS), theirs.logits(IDS)
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b))
    assert ours.generate(IDS[:4], max_new_tokens=12, ignore_eos=True) == \
        theirs.generate(IDS[:4], max_new_tokens=12, ignore_eos=True)
    assert ours.tokenizer.encode("Once upon a time") == theirs.tokenizer.encode("Once upon a time")


@pytest.mark.parametrize("type_name,kind", [("Q8_0", "int8"), ("Q4_0", "int4")])
def test_quantized_types_run_the_files_exact_meaning(checkpoints, tmp_path, type_name, kind):
    """Each repacked matrix multiplies as the file's dequantized values within the kernels' int16-activation bound
    (tests/test_quant.py), and the whole model stays within 1e-3 of the logit scale of the file's exact meaning:
    gguf-py's dequantized tensors in transformers run in float64."""
    torch = pytest.importorskip("torch")
    from engine.compare import gguf_reference

    path = write_gguf(checkpoints["float32"], tmp_path / f"m-{type_name}.gguf", type_name)
    model = engine.load_model(str(path))
    assert model.weights_dtype == kind
    w = model.backend.weights.layers[0].wqkv
    assert isinstance(w, QuantMatrix) and w.kind == kind
    from weights.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        raw = f.rows("model.layers.0.mlp.up_proj.weight")
        up = quants.dequantize(np.ascontiguousarray(raw), GGMLQuantizationType[type_name]).reshape(raw.shape[0], -1)
    inter = model.config.intermediate_size
    repacked = model.backend.weights.layers[0].w_gate_up
    np.testing.assert_array_equal(repacked.dequantize(slice(inter, 2 * inter)), up)
    x = np.random.default_rng(0).standard_normal((3, up.shape[1])).astype(np.float32)
    from engine.runtime.layers import linear

    got = linear(x, repacked)[:, inter:]
    assert np.all(np.abs(got - x.astype(np.float64) @ up.astype(np.float64).T) <= kernel_bound(x, up))
    reference = gguf_reference(path).double()
    with torch.no_grad():
        exact = reference(torch.tensor([IDS])).logits[0].numpy()
    ours = model.logits(IDS)
    assert np.max(np.abs(ours - exact)) <= 1e-3 * np.max(np.abs(exact))
    assert np.array_equal(ours.argmax(-1), exact.argmax(-1))


def test_stories260k_q8_0_with_its_own_tokenizer_and_check_cli(stories260k, tmp_path):
    """The real tiny model: the tokenizer from the file alone gives the folder's ids, generation runs, and `check`
    compares it with its file's exact meaning (the engine's KL there is far below llama.cpp's 3.7e-4)."""
    path = write_gguf(stories260k, tmp_path / "stories260K-q8_0.gguf", "Q8_0")
    model = engine.load_model(str(path))
    folder_model = engine.load_model(str(stories260k))
    text = "Once upon a time, there was a little girl.\n\nShe liked 3 cats: Tom, Tim & Kit!"
    assert model.tokenizer.encode(text) == folder_model.tokenizer.encode(text)
    assert model.tokenizer.decode(model.tokenizer.encode(text), skip_special_tokens=True) == text
    out = subprocess.run([sys.executable, "-m", "engine", "check", "--model", str(path), "--steps", "8", "--json",
                          "--no-llama-cpp"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert "exact meaning" in report["reference"] and report["weights_dtype"] == "int8"
    assert report["fidelity"]["top1_agreement"] == 1.0 and report["fidelity"]["kl_mean"] < 1e-6
    gen = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", str(path), "--max-new-tokens", "6",
                          "Once upon a time"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr
    tokens = subprocess.run([sys.executable, "-m", "engine", "inspect", "tokens", "--model", str(path), "Once upon"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert tokens.returncode == 0 and "▁Once" in tokens.stdout, tokens.stderr


def test_tinyllama_vocabulary_from_the_file_equals_hugging_face(tinyllama_tokenizer_dir, tmp_path):
    """TinyLlama's real 32000-token SentencePiece vocabulary (tokens, scores, types read from its tokenizer.model as
    llama.cpp's converter reads them) built from the file alone: the same ids as its tokenizer.json over spaces,
    newlines, digits, unicode and special tokens; the special ids and chat template too."""
    pytest.importorskip("sentencepiece")
    from engine.text.tokenizer import Tokenizer
    from tests.gguf_support import vocabulary

    tokens, scores, types = vocabulary(tinyllama_tokenizer_dir)
    template = json.loads((tinyllama_tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": template}
    ours = Tokenizer.from_gguf_metadata(meta)
    hf = Tokenizer.from_folder(tinyllama_tokenizer_dir)
    for text in CORPUS:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text))
    assert (ours.bos_id, ours.eos_ids) == (1, (2,))
    chat = [{"role": "user", "content": "Hi there!\nWho are you?"}]
    assert ours.encode_chat(chat) == hf.encode_chat(chat)


def test_byte_level_bpe_vocabulary_equals_tokenizers_gpt2_pipeline():
    """tokenizer.ggml.model "gpt2" (tokens and merges, pre-tokenizer "gpt-2"): the ids of the `tokenizers` pipeline
    GPT-2 uses (ByteLevel with its regex) over the same vocabulary, and its decoding; special tokens in the text."""
    from engine.text.tokenizer import Tokenizer
    from tests.gguf_support import trained_byte_level_bpe

    reference, vocab = trained_byte_level_bpe()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": vocab["tokens"],
            "tokenizer.ggml.token_type": vocab["types"], "tokenizer.ggml.merges": vocab["merges"],
            "tokenizer.ggml.bos_token_id": vocab["bos"], "tokenizer.ggml.add_bos_token": False}
    ours = Tokenizer.from_gguf_metadata(meta)
    for text in CORPUS + ["<|begin_of_text|>Hello<|end_of_text|> it's"]:
        ids = reference.encode(text).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False)
    assert ours.bos_id == vocab["bos"] and ours.encode("hi")[0] != vocab["bos"]  # add_bos_token False
    with pytest.raises(engine.EngineError, match="tokenizer.ggml.pre 'qwen9'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "qwen9"})


CORPUS = [
    "The capital of France is Paris.", "  two  spaces,\ttab and trailing   ", "line one\nline two\n\n\nthree",
    "digits 0 7 42 1234567 3.14159 2024-01-01", "unicode: café naïve Ærø 日本語 한국어 Привет 😀🚀 ∑∫",
    "<s>special</s> tokens <unk> inside text", "<|user|>\nHello!</s>\n<|assistant|>\n", "", " ", "\n", "a",
    "mixed\u00a0nbsp and zero\u200bwidth", "tabs\t\tand\r\nCRLF",
]


# -- the cache of repacked weights ------------------------------------------------------------------------------

def test_repacked_weights_are_cached_and_memory_mapped(checkpoints, tmp_path, monkeypatch):
    """A second load maps the entry and reads nothing of the file (not even its metadata: the GGUF reader is never
    called), with the same logits and the same tokenizer; a changed file is repacked again."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(quant_cache, "cache_folder", lambda: folder)
    monkeypatch.setenv("TINYLLAMA_QUANT_CACHE", "1")
    path = write_gguf(checkpoints["float32"], tmp_path / "m.gguf", "Q4_0")
    first = engine.load_model(str(path))
    assert len(list(folder.glob("*-gguf.bin"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("a cached load read the GGUF file")

    with monkeypatch.context() as m:
        m.setattr("weights.gguf_file.GGUFFile.__init__", no_reading)
        second = engine.load_model(str(path))
    w = second.backend.weights.layers[1].w_gate_up
    assert not w.data.flags.writeable and not w.data.flags.owndata  # a view of the mapped entry
    np.testing.assert_array_equal(first.logits(IDS), second.logits(IDS))
    assert second.tokenizer.encode("Once upon a time") == first.tokenizer.encode("Once upon a time")
    assert second.config == first.config
    path.touch()  # a changed file (time): the entry is stale, repacked again
    with monkeypatch.context() as m:
        m.setattr(type(ggml_formats.lookup("Q4_0")), "repack_into", no_reading)
        with pytest.raises(AssertionError, match="read the GGUF"):
            engine.load_model(str(path))


# -- bad files: one line, non-zero exit --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_file(checkpoints, tmp_path_factory):
    return write_gguf(checkpoints["float32"], tmp_path_factory.mktemp("good") / "m.gguf", "Q8_0")


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        engine.load_model(str(path))
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_file(good_file, tmp_path):
    data = good_file.read_bytes()
    for size in (6, 200, len(data) - 100):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        assert "truncated" in load_error(cut)


def test_wrong_magic_and_version(good_file, tmp_path):
    assert "not a GGUF file" in load_error(copy_with(good_file, tmp_path / "magic.gguf", 0, b"GGML"))
    message = load_error(copy_with(good_file, tmp_path / "version.gguf", 4, struct.pack("<I", 9)))
    assert "version 9" in message and "2, 3" in message


def test_other_architecture_names_what_runs(checkpoints, tmp_path):
    path = write_gguf(checkpoints["float32"], tmp_path / "qwen.gguf", "F32", arch="qwen2")
    message = load_error(path)
    assert "'qwen2'" in message and "llama" in message


def test_tensor_shape_against_metadata(checkpoints, tmp_path):
    def wider(meta):
        meta["feed_forward_length"] += 32

    message = load_error(write_gguf(checkpoints["float32"], tmp_path / "shape.gguf", "F32", edit_metadata=wider))
    assert "ffn_gate.weight" in message and "shape" in message


def test_missing_metadata_and_tokenizer(checkpoints, tmp_path):
    def no_eps(meta):
        del meta["attention.layer_norm_rms_epsilon"]

    assert "llama.attention.layer_norm_rms_epsilon" in load_error(
        write_gguf(checkpoints["float32"], tmp_path / "eps.gguf", "F32", edit_metadata=no_eps))
    assert "tokenizer.ggml" in load_error(write_gguf(checkpoints["float32"], tmp_path / "tok.gguf", "F32",
                                                     tokenizer=False))


def test_unsupported_type_names_type_tensor_and_what_runs(checkpoints, tmp_path):
    """A tensor of a type no format runs is refused before anything is read: IQ4_NL has Q4_0's block size (32 values
    in 18 bytes), so a Q4_0 file with one tensor relabelled IQ4_NL in its tensor table is a well-formed file."""
    import gguf

    q4 = write_gguf(checkpoints["float32"], tmp_path / "q4.gguf", "Q4_0")
    reader = gguf.GGUFReader(q4)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    type_offset = t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:4])  # name len, name, n_dims, dims
    del reader
    assert gguf.GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_NL] == gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    bad = copy_with(q4, tmp_path / "iq4.gguf", type_offset, struct.pack("<I", GGMLQuantizationType.IQ4_NL.value))
    message = load_error(bad)
    assert "IQ4_NL" in message and "blk.0.ffn_down.weight" in message and "Q4_0" in message and "F16" in message


def test_cli_bad_file_is_one_line_and_exit_1(good_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good_file.read_bytes()[:300])
    for command in (["generate", "--model", str(cut), "hi"], ["inspect", "tokens", "--model", str(cut), "hi"],
                    ["check", "--model", str(tmp_path / "missing.gguf")]):
        out = subprocess.run([sys.executable, "-m", "engine", *command], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and "tinyllama: error:" in out.stderr, out.stderr


def test_a_folder_of_gguf_files(good_file, tmp_path):
    """A folder holding one .gguf file and no safetensors is that file; with several, one line names them."""
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "m.Q8_0.gguf").symlink_to(good_file)
    assert engine.load_model(str(folder)).gguf_path.name == "m.Q8_0.gguf"
    (folder / "m.Q4_0.gguf").symlink_to(good_file)
    message = load_error(folder)
    assert "m.Q4_0.gguf, m.Q8_0.gguf" in message and "--gguf-file" in message
    assert engine.load_model(str(folder), gguf_file="m.Q4_0.gguf").gguf_path.name == "m.Q4_0.gguf"


def test_weights_dtype_and_backend_a_gguf_does_not_take(good_file):
    with pytest.raises(engine.EngineError, match="GGUF"):
        engine.load_model(str(good_file), weights_dtype="int4")
    with pytest.raises(engine.EngineError, match="numpy"):
        engine.load_model(str(good_file), backend="triton")
    widened = engine.load_model(str(good_file), weights_dtype="float32")
    assert widened.weights_dtype == "float32"
    np.testing.assert_allclose(widened.logits(IDS), engine.load_model(str(good_file)).logits(IDS), rtol=0,
                               atol=2e-3 * np.abs(widened.logits(IDS)).max())


def test_quant_cache_key_uses_the_gguf_header(good_file):
    """The cache fingerprints a GGUF by its metadata and tensor table, not by a safetensors header length."""
    from weights.gguf_file import GGUFFile

    with GGUFFile(good_file) as f:
        key = quant_cache.entry_key([good_file], "gguf", {}, header_bytes=f.header_bytes)
    assert key["files"][0]["size"] == good_file.stat().st_size


# -- memory: the load holds the repacked weights, not the file's pages beside them -----------------------------------

MEMORY_SHAPE = dict(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                    num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
GGUF_LOAD_PEAK_RATIO = 1.1  # docs/gguf.md: the load's peak within 1.1x the file's size, plus a fixed part:
FIXED_MB = 40  # gguf-py's parse of the metadata (a 16000-token vocabulary here: ~26 MB at its peak) and the tokenizer

WRITE_Q8_0_FILE = """
import json, sys
import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, quants
from engine.config import ModelConfig
from tests.gguf_support import gguf_name, llamacpp_permute

path, shape = sys.argv[1], json.loads(sys.argv[2])
config = ModelConfig.from_dict(dict(shape, architectures=["LlamaForCausalLM"], model_type="llama"))
w = gguf.GGUFWriter(path, "llama")
for key, value in (("context_length", config.max_position_embeddings), ("embedding_length", config.hidden_size),
                   ("feed_forward_length", config.intermediate_size), ("block_count", config.num_hidden_layers),
                   ("attention.head_count", config.num_attention_heads),
                   ("attention.head_count_kv", config.num_key_value_heads)):
    w.add_uint32("llama." + key, value)
w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
w.add_tokenizer_model("llama")
w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(config.vocab_size - 3)])
w.add_token_scores([0.0] * config.vocab_size)
w.add_token_types([2, 3, 3] + [1] * (config.vocab_size - 3))
block = (0.02 * np.random.default_rng(0).standard_normal(1 << 20)).astype(np.float32)
for name, s in config.tensor_shapes().items():
    values = np.resize(block, s)
    w.add_tensor(gguf_name(name), values if len(s) == 1 else quants.quantize(values, T.Q8_0),
                 raw_dtype=None if len(s) == 1 else T.Q8_0)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS / VmHWM from /proc (Linux)")
def test_load_peak_stays_within_the_files_size(tmp_path):
    """A Q8_0 file (~80 MB) loaded in a fresh process: RSS peak less the RSS before the load, against the file's size
    (the tensors are repacked a few MB at a time and the file's pages dropped as they are done; holding the file's
    pages beside the repacked copy, or a tensor's temporaries, would show as 1.3x-2x)."""
    path = tmp_path / "big.gguf"
    done = subprocess.run([sys.executable, "-c", WRITE_Q8_0_FILE, str(path), json.dumps(MEMORY_SHAPE)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "TINYLLAMA_QUANT_CACHE": "0"})
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout)
    size = path.stat().st_size
    assert m["weight_bytes"] > 0.95 * size  # the repacked weights: the file's bytes in our layout
    ratio = (m["peak"] - m["before"] - FIXED_MB * 2**20) / size
    assert ratio <= GGUF_LOAD_PEAK_RATIO, f"load peak {ratio:.3f}x the file's size (+ {FIXED_MB} MB)"


# -- the server ----------------------------------------------------------------------------------------------------

def test_serve_a_gguf_file_with_its_own_chat_template(tiny_chat_model, tmp_path):
    """`tinyllama serve --model file.gguf`: the file's chat template and tokenizer answer the OpenAI route, the same
    reply as the safetensors folder's; a broken file ends the server at start with one line and exit 1."""
    import httpx

    from tests.serve_support import ServerProcess

    template = json.loads((tiny_chat_model / "tokenizer_config.json").read_text())["chat_template"]
    path = write_gguf(tiny_chat_model, tmp_path / "chat.gguf", "F32", chat_template=template)
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 6, "temperature": 0}
    replies = []
    for ref in (str(path), str(tiny_chat_model)):
        server = ServerProcess("--model", ref, "--served-model-name", "m").wait_ready(timeout=300)
        try:
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            replies.append(r.json()["choices"][0]["message"]["content"])
        finally:
            server.stop()
    folder_model = engine.load_model(str(tiny_chat_model))
    chat = [{"role": "user", "content": "Hi!"}]
    assert engine.load_model(str(path)).tokenizer.encode_chat(chat) == folder_model.tokenizer.encode_chat(chat)
    assert replies[0] and replies[0] == replies[1]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:4000])
    out = subprocess.run([sys.executable, "-m", "engine", "serve", "--port", "0", "--model", str(cut)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "truncated" in out.stderr.strip().splitlines()[-1], out.stderr
