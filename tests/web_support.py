"""A small Llama checkpoint with TinyLlama's real tokenizer and chat template whose greedy reply is known in advance:
a sentence that contains HTML (`<script>alert(1)</script><img src=x onerror="fail()">`), repeated until max_tokens.

It is a real checkpoint run by the real engine, built so the reply is fixed: every layer's o_proj and down_proj are
zero, so the residual stream at a position is that token's embedding, and the model is a bigram table. The reply's
tokens (and the chat template's last prompt token, '\\n') get one-hot embeddings, and lm_head gives the next token
of the cycle a logit well above the random rest, by a margin that varies along the sentence so the probabilities
do too. Attention still runs (its q/k projections are random and scaled up so heads differ), it just adds nothing
to the stream.
"""
from __future__ import annotations

import json
from pathlib import Path


import numpy as np

REPLY_PIECES = ['▁Hello', '!', '▁I', '▁am', '▁a', '▁tiny', '▁test', '▁model', ',', '▁and', '▁it', '▁writes', '▁<',
                'script', '>', 'alert', '(', '1', ')', '</', 'scr', 'ipt', '><', 'img', '▁src', '=', 'x', '▁on',
                'error', '="', 'fail', '()', '">']
NEWLINE_PIECE = "<0x0A>"  # the last token of TinyLlama's chat prompt ('<|assistant|>\n')
HIDDEN = 64
VOCAB = 32000


def make_html_reply_checkpoint(folder: Path, tokenizer_dir: Path, window: int = 2048, seed: int = 5) -> Path:
    """Save the checkpoint into `folder` (float32 safetensors, config.json, TinyLlama's tokenizer files)."""
    from safetensors.numpy import save_file

    from engine.text.tokenizer import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": window, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": VOCAB,
              "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer = Tokenizer.from_folder(folder)
    cycle = [tokenizer.token_to_id(p) for p in REPLY_PIECES]
    newline = tokenizer.token_to_id(NEWLINE_PIECE)
    assert None not in cycle and len(set(cycle)) == len(cycle) and newline not in cycle

    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // 4

    def normal(*shape, std=0.1):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    embed, lm_head = normal(VOCAB, HIDDEN), normal(VOCAB, HIDDEN)
    predecessors = [newline] + cycle  # predecessors[j] is followed by cycle[j % n]
    for j, token in enumerate(predecessors):
        embed[token] = 0.0
        embed[token, j] = 1.0  # after the final RMSNorm (weight 1): sqrt(HIDDEN) e_j
        margin = rng.uniform(10.5, 15.0)  # p(next) from about 0.45 to 0.99 against 32000 random logits (std 0.8)
        lm_head[cycle[j % len(cycle)], j] = margin / np.sqrt(HIDDEN)
    tensors = {"model.embed_tokens.weight": embed, "lm_head.weight": lm_head,
               "model.norm.weight": np.ones(HIDDEN, np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": 1.0 + normal(HIDDEN, std=0.2),
            p + "post_attention_layernorm.weight": 1.0 + normal(HIDDEN, std=0.2),
            p + "self_attn.q_proj.weight": normal(4 * head_dim, HIDDEN, std=0.2),  # peaked, varied heads
            p + "self_attn.k_proj.weight": normal(2 * head_dim, HIDDEN, std=0.2),
            p + "self_attn.v_proj.weight": normal(2 * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": np.zeros((HIDDEN, 4 * head_dim), np.float32),  # adds nothing
            p + "mlp.gate_proj.weight": normal(128, HIDDEN),
            p + "mlp.up_proj.weight": normal(128, HIDDEN),
            p + "mlp.down_proj.weight": np.zeros((HIDDEN, 128), np.float32),  # adds nothing
        })
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def greedy_reply_ids(n: int, tokenizer) -> list[int]:
    """The first n token ids of the checkpoint's greedy reply."""
    cycle = [tokenizer.token_to_id(p) for p in REPLY_PIECES]
    return [cycle[i % len(cycle)] for i in range(n)]
