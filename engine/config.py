"""ModelConfig: the numbers in a Llama checkpoint's config.json that the forward pass needs, validated."""
from __future__ import annotations

from dataclasses import dataclass, field

from weights.errors import CheckpointError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and constants of a Llama-architecture model (Hugging Face `LlamaConfig` field names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}; None for plain RoPE
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    torch_dtype: str | None = None
    source: str = field(default="config.json", compare=False)

    @property
    def q_size(self) -> int:
        """Width of the query projection: num_attention_heads * head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projections: num_key_value_heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1: multi-head attention; num_attention_heads: multi-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name this config implies in a Hugging Face checkpoint, with its shape ([out, in] for linears)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.q_size, h),
                p + "self_attn.k_proj.weight": (self.kv_size, h),
                p + "self_attn.v_proj.weight": (self.kv_size, h),
                p + "self_attn.o_proj.weight": (h, self.q_size),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
        return shapes

    def weight_count(self) -> int:
        """Number of parameters (the tied lm_head counted once)."""
        total = sum(int(_prod(s)) for s in self.tensor_shapes().values())
        return total - (self.vocab_size * self.hidden_size if self.tie_word_embeddings else 0)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a parsed config.json; CheckpointError naming `source` for anything missing, invalid or unsupported."""
        return _parse(d, source)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _parse(d: dict, source: str) -> ModelConfig:
    def fail(msg: str) -> CheckpointError:
        """A CheckpointError for `msg`, prefixed with the config's source."""
        return CheckpointError(f"{source}: {msg}")

    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    if model_type != "llama" and "LlamaForCausalLM" not in archs:
        found = model_type or ", ".join(archs) or "nothing"
        raise fail(f"not a Llama-architecture model (model_type {found!r}); only Llama checkpoints are supported")

    def positive_int(key: str, default=None) -> int:
        """d[key] (`default` when absent), checked to be a positive int; CheckpointError otherwise."""
        value = d.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise fail(f"'{key}' must be a positive integer, got {value!r}")
        return value

    def number(key: str, default) -> float:
        """d[key] (`default` when absent) as a float, checked to be positive; CheckpointError otherwise."""
        value = d.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise fail(f"'{key}' must be a positive number, got {value!r}")
        return float(value)

    hidden = positive_int("hidden_size")
    heads = positive_int("num_attention_heads")
    kv_heads = positive_int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise fail(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    if d.get("head_dim") is None:
        if hidden % heads:
            raise fail(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) and no head_dim is given")
        head_dim = hidden // heads
    else:
        head_dim = positive_int("head_dim")
    if head_dim % 2:
        raise fail(f"head_dim ({head_dim}) must be even for rotary embeddings")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise fail(f"hidden_act {act!r} is not supported (Llama uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise fail(f"'{key}: true' is not supported (Llama checkpoints have no biases)")

    rope_theta, rope_scaling = _rope(d, fail)
    eos = d.get("eos_token_id", 2)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
        raise fail(f"'eos_token_id' must be an integer or a list of integers, got {eos!r}")
    bos = d.get("bos_token_id", 1)
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        raise fail(f"'bos_token_id' must be an integer, got {bos!r}")
    return ModelConfig(
        vocab_size=positive_int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=positive_int("intermediate_size"),
        num_hidden_layers=positive_int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=positive_int("max_position_embeddings", 2048),
        rms_norm_eps=number("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        source=source,
    )


def _rope(d: dict, fail) -> tuple[float, dict | None]:
    """rope_theta and rope scaling from either transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise fail(f"'rope_parameters' must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise fail(f"'rope_scaling' must be an object or null, got {scaling!r}")
    merged = {**(params or {}), **(scaling or {})}
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise fail(f"'rope_theta' must be a positive number, got {theta!r}")
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise fail(f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in merged.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    needed = ["factor"] + (["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
                           if rope_type == "llama3" else [])
    for key in needed:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise fail(f"rope_scaling {rope_type!r} needs a positive '{key}', got {value!r}")
    return float(theta), scaling
