"""The Triton backend takes 16-bit host weights straight to the device: NumPy uint16 (bfloat16 bits), float16 and
float32 arrays are all accepted, the device holds exactly the checkpoint's values in the compute dtype, and no
float32 host copy of a 16-bit matrix is ever made.

Weights are built by hand from transformers checkpoints' tensors (bf16 and fp16 safetensors) in each representation;
logits are compared with the float32-upload path (today's representation) and transformers.
"""
import tracemalloc

import numpy as np
import pytest

from tests.kernel_support import torch  # first: sets TRITON_INTERPRET
from engine.config import ModelConfig
from engine.runtime.batch import SequenceStep
from engine.runtime.weights import LayerWeights, ModelWeights
from tinyllama_kernels import triton_backend
from tinyllama_kernels.launch import H100
from tinyllama_kernels.triton_backend import TritonBackend, host_tensor
from tests.conftest import load_reference, make_random_checkpoint, reference_logits

safetensors_torch = pytest.importorskip("safetensors.torch")

PROMPT = [1, 17, 200, 5, 33, 90, 7]
REPRESENT = {  # a checkpoint tensor -> the NumPy array the loader holds for it
    "bfloat16": lambda t: t.contiguous().view(torch.int16).numpy().view(np.uint16),
    "float16": lambda t: t.contiguous().numpy(),
    "float32": lambda t: t.float().numpy(),  # exact widening: today's representation
}


def _weights(tensors: dict, config: ModelConfig, represent) -> ModelWeights:
    """ModelWeights of a checkpoint's torch tensors: matrices and embedding via `represent`, norms float32."""
    def m(*names):
        return represent(torch.cat([tensors[n] for n in names]))

    def norm(name):
        return tensors[name].float().numpy()

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            attn_norm=norm(p + "input_layernorm.weight"),
            wqkv=m(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
            wo=m(p + "self_attn.o_proj.weight"), mlp_norm=norm(p + "post_attention_layernorm.weight"),
            w_gate_up=m(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), w_down=m(p + "mlp.down_proj.weight")))
    embed = m("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings else m("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, final_norm=norm("model.norm.weight"), lm_head=lm_head)


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def checkpoint(request, tmp_path_factory):
    """(stored dtype, folder, config, tensors): a random transformers checkpoint saved in that dtype (the fp16 one
    with tied embeddings)."""
    import json

    stored = request.param
    folder = make_random_checkpoint(tmp_path_factory.mktemp(stored), dtype=stored, vocab_size=256, hidden_size=64,
                                    intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                    tie_word_embeddings=stored == "float16", seed=5)
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {getattr(torch, stored)}
    config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return stored, folder, config, tensors


def _logits(backend) -> list[np.ndarray]:
    cache = backend.new_cache()
    out = backend.forward([SequenceStep(cache, PROMPT, all_logits=True)])
    out += backend.forward([SequenceStep(cache, [42])])  # and one decode step through the cache
    return out


@pytest.mark.parametrize("compute", ["float32", "bfloat16", "float16"])
def test_16bit_host_weights_give_the_float32_upload_paths_logits(checkpoint, compute):
    stored, folder, config, tensors = checkpoint
    w16 = _weights(tensors, config, REPRESENT[stored])
    w32 = _weights(tensors, config, REPRESENT["float32"])
    assert w16.layers[0].wqkv.dtype == (np.uint16 if stored == "bfloat16" else np.float16)
    b16 = TritonBackend(config, w16, dtype=compute, cuda_graphs=False)
    b32 = TritonBackend(config, w32, dtype=compute, cuda_graphs=False)
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):  # the device holds the same numbers either way
        assert torch.equal(getattr(b16.layers[1], name), getattr(b32.layers[1], name))
        assert getattr(b16.layers[1], name).dtype == getattr(torch, compute)
    assert torch.equal(b16.embed, b32.embed) and torch.equal(b16.lm_head, b32.lm_head)
    assert (b16.lm_head is b16.embed) == config.tie_word_embeddings

    ours, ref = _logits(b16), _logits(b32)
    for o, r in zip(ours, ref):
        if compute in (stored, "float32"):  # nothing rounds differently: bit for bit
            assert np.array_equal(o, r)
        else:
            np.testing.assert_allclose(o, r, rtol=0, atol=2e-2 * np.abs(r).max())
    if compute == "float32":  # and the checkpoint's own reference, transformers in fp32
        want = reference_logits(load_reference(folder), PROMPT)
        assert np.max(np.abs(ours[0] - want)) < 1e-4 * np.abs(want).max() + 1e-5


def test_other_arrays_are_refused():
    with pytest.raises(TypeError, match="uint16"):
        host_tensor(np.zeros((2, 2), dtype=np.float64))
    bits = np.array([[0x3F80, 0xC000]], dtype=np.uint16)  # bf16 1.0 and -2.0
    t = host_tensor(bits)
    assert t.dtype == torch.bfloat16 and t.tolist() == [[1.0, -2.0]]
    assert t.data_ptr() == bits.ctypes.data  # the same memory, no copy


# ---- no float32 host copy -----------------------------------------------------------------------------------------

class _HostFloat32Tensors:
    """Records every CPU float32 tensor an aten op returns (torch's side of the host), via a dispatch mode."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        sizes = self.sizes = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32:
                        sizes.append((str(func), t.numel()))
                return out

        self.mode = Mode()


def _host_f32_while_uploading(config, weights, compute) -> tuple[int, int]:
    """(largest CPU float32 tensor torch made, traced peak of Python allocations (NumPy's arrays included) in bytes)
    while a backend uploads `weights` to the meta device (a stand-in GPU: whatever is allocated is the host's).
    Two separate uploads: the dispatch mode's own bookkeeping would count in tracemalloc's peak."""
    def upload():
        TritonBackend(config, weights, dtype=compute, device="meta", target=H100)

    upload()  # lazy imports happen outside the measurements
    spy = _HostFloat32Tensors()
    with spy.mode:
        upload()
    tracemalloc.start()
    try:
        upload()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return max((n for _, n in spy.sizes), default=0), peak


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_upload_makes_no_float32_host_copy_of_a_16bit_matrix(compute, monkeypatch):
    config = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64)
    rng = np.random.default_rng(0)

    def bf16(*shape):  # random bf16 bit patterns of normal numbers
        return (rng.integers(0x3C00, 0x4000, size=shape) | (rng.integers(0, 2, size=shape) << 15)).astype(np.uint16)

    def norm():
        return np.ones(config.hidden_size, dtype=np.float32)

    layers = [LayerWeights(attn_norm=norm(), wqkv=bf16(512, 256), wo=bf16(256, 256), mlp_norm=norm(),
                           w_gate_up=bf16(1024, 256), w_down=bf16(256, 512)) for _ in range(2)]
    weights = ModelWeights(embed=bf16(512, 256), layers=layers, final_norm=norm(), lm_head=bf16(512, 256))
    smallest = 256 * 256  # wo: the smallest matrix, in elements

    largest, numpy_peak = _host_f32_while_uploading(config, weights, compute)
    assert largest < smallest and numpy_peak < 4 * smallest

    # the checks see a host detour: widening with torch before the copy ...
    monkeypatch.setattr(triton_backend, "upload",
                        lambda a, device, dtype: host_tensor(a).float().to(device=device, dtype=dtype))
    assert _host_f32_while_uploading(config, weights, compute)[0] >= smallest
    # ... or with NumPy (bf16 bits shifted into float32)
    monkeypatch.setattr(triton_backend, "upload", lambda a, device, dtype: torch.from_numpy(
        (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a).to(device=device, dtype=dtype))
    assert _host_f32_while_uploading(config, weights, compute)[1] >= 4 * smallest
