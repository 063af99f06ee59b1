"""ModelWeights: a checkpoint's tensors as float32 arrays in the layout the forward pass uses.

Hugging Face's [out_features, in_features] layout is kept (y = x @ W.T reads W row by row, the fastest way), and
the projections that read the same input are fused into one matrix: q/k/v into `wqkv`, gate/up into `w_gate_up`.
Each tensor is copied straight from the memory-mapped file into its slice of the fused array: no second copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import ModelConfig
from weights.checkpoint import Checkpoint


@dataclass
class LayerWeights:
    """One decoder layer (H = hidden, I = intermediate, Q = heads*head_dim, KV = kv_heads*head_dim), float32."""

    attn_norm: np.ndarray  # (H,)
    wqkv: np.ndarray  # (Q + 2*KV, H): rows of q_proj, then k_proj, then v_proj
    wo: np.ndarray  # (H, Q)
    mlp_norm: np.ndarray  # (H,)
    w_gate_up: np.ndarray  # (2*I, H): rows of gate_proj, then up_proj
    w_down: np.ndarray  # (H, I)


@dataclass
class ModelWeights:
    """All weights of a Llama model, float32."""

    embed: np.ndarray  # (vocab, H)
    layers: list[LayerWeights]
    final_norm: np.ndarray  # (H,)
    lm_head: np.ndarray  # (vocab, H); the same array as `embed` when embeddings are tied

    @property
    def nbytes(self) -> int:
        """Bytes of all weight arrays (a tied lm_head counted once)."""
        arrays = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            arrays += [layer.attn_norm, layer.wqkv, layer.wo, layer.mlp_norm, layer.w_gate_up, layer.w_down]
        return sum(a.nbytes for a in arrays)


def expected_tensors(config: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape of every tensor the config implies, names that may be absent: lm_head when tied)."""
    return config.tensor_shapes(), ({"lm_head.weight"} if config.tie_word_embeddings else set())


def load_model_weights(checkpoint: Checkpoint, config: ModelConfig) -> ModelWeights:
    """Validate `checkpoint` against `config`, then read every tensor into fused float32 arrays."""
    shapes, optional = expected_tensors(config)
    checkpoint.validate(shapes, optional)

    def read_rows(names: list[str]) -> np.ndarray:
        """Tensors `names` stacked row-wise into one new array: (sum of their rows, in_features) float32."""
        rows = sum(shapes[n][0] for n in names)
        out = np.empty((rows,) + shapes[names[0]][1:], dtype=np.float32)
        start = 0
        for name in names:
            n = shapes[name][0]
            checkpoint.read_into(name, out[start : start + n])
            start += n
        return out

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                attn_norm=checkpoint.read(p + "input_layernorm.weight"),
                wqkv=read_rows([p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"]),
                wo=checkpoint.read(p + "self_attn.o_proj.weight"),
                mlp_norm=checkpoint.read(p + "post_attention_layernorm.weight"),
                w_gate_up=read_rows([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                w_down=checkpoint.read(p + "mlp.down_proj.weight"),
            )
        )
    embed = checkpoint.read("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings else checkpoint.read("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, final_norm=checkpoint.read("model.norm.weight"), lm_head=lm_head)
