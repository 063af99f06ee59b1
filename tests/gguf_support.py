"""GGUF files for the tests, made without llama.cpp: a Hugging Face checkpoint folder written with gguf-py's
GGUFWriter the way llama.cpp's converter writes a Llama (its tensor names, its metadata keys, the q_proj / k_proj
rows permuted for its rotary layout, the vocabulary from the folder's tokenizer), every matrix in one ggml type
(F32, F16, BF16 as stored; Q8_0, Q4_0 by gguf-py's own quantizer, `gguf.quants.quantize`). The files llama.cpp's own
converter makes are tested too, where llama-cpp-python is installed (tests/test_gguf.py)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

gguf = __import__("pytest").importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

from weights.checkpoint import open_checkpoint  # noqa: E402

NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
         "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
         "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}


KQUANT_MADE_HERE = ("q4_k", "q5_k", "q6_k")  # written by our quantizer (gguf-py has none for them)


def gguf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    return f"blk.{m.group(1)}.{LAYER[m.group(2)]}"


def llamacpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for q_proj / k_proj (LlamaModel.permute): each head's halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def vocabulary(folder: Path) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, token types of the folder's tokenizer: from tokenizer.model with sentencepiece where both are
    there (the real scores, as llama.cpp's converter reads them), else from tokenizer.json (scores -1000, as the
    converter's LlamaHfVocab writes them)."""
    if (folder / "tokenizer.model").exists():
        try:
            from sentencepiece import SentencePieceProcessor
        except ImportError:
            SentencePieceProcessor = None
        if SentencePieceProcessor is not None:
            sp = SentencePieceProcessor()
            sp.LoadFromFile(str(folder / "tokenizer.model"))
            tokens, scores, types = [], [], []
            for i in range(sp.vocab_size()):
                tokens.append(sp.IdToPiece(i))
                scores.append(sp.GetScore(i))
                types.append(2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i)
                             else 6 if sp.IsByte(i) else 1)
            return tokens, scores, types
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    types = [3 if i in special else 6 if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) else 1 for i, t in enumerate(tokens)]
    return tokens, [-1000.0] * len(tokens), types


def write_gguf(folder, out, type_name: str = "F32", arch: str = "llama", tokenizer: bool = True,
               edit_metadata=None, chat_template: str | None = None, bpe: dict | None = None,
               tensor_types=None) -> Path:
    """The checkpoint in `folder` as the GGUF file `out` with every matrix in `type_name` (norms F32).
    edit_metadata(dict) may change the `llama.*` values (arch key prefix left off) before they are written.
    bpe: a byte-level BPE vocabulary to write instead of the folder's ({tokens, types, merges, pre, bos}).
    tensor_types: a function (Hugging Face tensor name) -> ggml type name of that matrix, instead of type_name (a
    mixed file, as llama.cpp's q4_K_M); the k-quants, which gguf-py cannot make, by our quantizer
    (engine.runtime.kquant.quantize_ggml: ggml's own blocks)."""
    folder, out = Path(folder), Path(out)
    config, ckpt = open_checkpoint(folder)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    meta = {"context_length": config["max_position_embeddings"], "embedding_length": config["hidden_size"],
            "feed_forward_length": config["intermediate_size"], "block_count": config["num_hidden_layers"],
            "attention.head_count": heads, "attention.head_count_kv": kv_heads,
            "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
            "rope.freq_base": float(config.get("rope_theta", 10000.0)), "rope.dimension_count": head_dim,
            "vocab_size": config["vocab_size"]}
    if edit_metadata:
        edit_metadata(meta)
    writer = gguf.GGUFWriter(str(out), arch)
    for key, value in meta.items():
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", int(value))
    writer.add_file_type(0)
    if bpe is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe["pre"])
        writer.add_token_list(bpe["tokens"])
        writer.add_token_types(bpe["types"])
        writer.add_token_merges(bpe["merges"])
        writer.add_bos_token_id(bpe["bos"])
        writer.add_eos_token_id(bpe["bos"] + 1)
        writer.add_add_bos_token(False)
    elif tokenizer:
        tokens, scores, types = vocabulary(folder)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(config.get("bos_token_id", 1))
        writer.add_eos_token_id(config.get("eos_token_id", 2))
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        if chat_template:
            writer.add_chat_template(chat_template)
    with ckpt:
        for name in ckpt.names:
            info = ckpt.info(name)
            if info.dtype == "BF16" and type_name == "BF16" and len(info.shape) == 2:
                bits = np.empty(info.shape, dtype=np.uint16)
                ckpt.read_into(name, bits)
                values = None
            else:
                values = ckpt.read(name)
                bits = None
            if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
                n = heads if "q_proj" in name else kv_heads
                values = llamacpp_permute(values, n) if values is not None else None
                bits = llamacpp_permute(bits, n) if bits is not None else None
            tname = tensor_types(name) if tensor_types is not None and len(info.shape) == 2 else type_name
            if len(info.shape) == 1 or tname == "F32":
                writer.add_tensor(gguf_name(name), np.ascontiguousarray(values, dtype=np.float32))
            elif bits is not None:
                writer.add_tensor(gguf_name(name), np.ascontiguousarray(bits).view(np.uint8),
                                  raw_dtype=GGMLQuantizationType.BF16)
            elif tname == "F16" or info.shape[1] % gguf.GGML_QUANT_SIZES[GGMLQuantizationType[tname]][0]:
                writer.add_tensor(gguf_name(name), values.astype(np.float16))  # rows not whole blocks: F16, as
                # llama.cpp's converter falls back
            elif tname.lower() in KQUANT_MADE_HERE:
                from engine.runtime import kquant

                qtype = GGMLQuantizationType[tname]
                writer.add_tensor(gguf_name(name), kquant.quantize_ggml(np.ascontiguousarray(values, np.float32),
                                                                       tname.lower()), raw_dtype=qtype)
            else:
                qtype = GGMLQuantizationType[tname]
                writer.add_tensor(gguf_name(name), quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def copy_with(path: Path, out: Path, offset: int, data: bytes) -> Path:
    """A copy of the file at `path` with `data` written at byte `offset`."""
    shutil.copy(path, out)
    with open(out, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return out


def trained_byte_level_bpe(vocab_size: int = 400):
    """A small byte-level BPE (GPT-2's pre-tokenizer: tokenizers' ByteLevel with its regex) trained by `tokenizers`
    on a corpus of words, digits, spaces, newlines and unicode, with two special tokens first -> (the tokenizers
    Tokenizer, its vocabulary as GGUF writes it: tokens, types, merges "a b", bos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The capital of France is Paris. Hello world! It's 12345 numbers, 3.14 and 2024-01-01.",
              "  spaces\n\nnewlines\ttabs café naïve 日本語 😀 don't we'll they've"] * 50
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    special = {t["id"] for t in data["added_tokens"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    return tok, {"tokens": tokens, "types": [3 if i in special else 1 for i in range(len(tokens))],
                 "merges": merges, "bos": vocab["<|begin_of_text|>"]}
