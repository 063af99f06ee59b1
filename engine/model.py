"""Model: a loaded checkpoint on a backend, with the public API (`load_model`, `logits`, `generate`)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from engine.config import ModelConfig
from engine.errors import EngineError
from engine.generation.generate import Generation, generate, generate_batch
from engine.generation.state import default_options
from engine.runtime.batch import SequenceStep
from engine.runtime.numpy_backend import NumpyBackend
from engine.runtime import calibration, kquant_mix, native
from engine.runtime.trace import TRACE_MEMORY_LIMIT, Trace, TraceRecorder
from engine.runtime.weights import choose_weights_dtype, load_model_weights, stored_dtype
from engine.text.chat_templates import resolve_chat_template
from engine.text.tokenizer import Tokenizer
from weights.checkpoint import open_checkpoint, read_json
from weights.errors import CheckpointError
from weights.gguf_file import GGUFFile, is_gguf_path
from weights.hub import DEFAULT_MODEL, folder_gguf, resolve_gguf_file, resolve_model_folder

BACKENDS = ("numpy", "triton")


class Model:
    """A Llama model ready to run: `config`, a backend (`numpy` or `triton`), and the tokenizer when the folder has one."""

    gguf_path: Path | None = None  # the GGUF file the weights came from (None for a safetensors folder)
    _tokenizer_loader = None  # () -> Tokenizer: a GGUF file's own (built on first use)

    def __init__(self, config: ModelConfig, backend, folder: Path | None = None, generation_config: dict | None = None,
                 weights_dtype: str | None = None, weights_dtype_reason: str = "", gguf_path: Path | None = None,
                 tokenizer_loader=None):
        self.config = config
        self.backend = backend
        self.folder = folder
        self.gguf_path = gguf_path  # the GGUF file the weights came from (None for a safetensors folder)
        self._tokenizer_loader = tokenizer_loader  # () -> Tokenizer: a GGUF file's own (built on first use)
        self.generation_config = generation_config or {}
        self._weights_dtype = weights_dtype
        self.weights_dtype_reason = weights_dtype_reason  # why the weights are held as `weights_dtype`
        self._tokenizer = None
        self._chat_template = None  # a ChatTemplate chosen by the caller (use_chat_template), applied to the tokenizer
        self._drafts: dict[str, "Model"] = {}

    def draft_model(self, kind: str) -> "Model":
        """The model's own weights held as `kind` ("int8", "int4", or any weights_dtype) as a second Model on the
        NumPy backend with its own caches: the draft of self-speculative decoding. Loaded on first use and kept;
        the tokenizer is shared, and so is every weight array the draft holds unchanged (norms, an unquantized
        embedding table), so memory is this model plus the draft's quantized matrices."""
        if kind == self.weights_dtype:
            return self  # the model itself (its caches are separate): nothing more to hold
        if kind not in self._drafts:
            if self.folder is None:
                raise EngineError("a draft copy needs the model's safetensors folder to load from (a GGUF model "
                                  "has none: use --draft lookup)")
            draft = load_model(str(self.folder), backend="numpy", weights_dtype=kind)
            draft._tokenizer = self._tokenizer
            if isinstance(self.backend, NumpyBackend):
                share_equal_arrays(self.backend.weights, draft.backend.weights)
            self._drafts[kind] = draft
        return self._drafts[kind]

    @property
    def weights_dtype(self) -> str:
        """How the weight matrices are held in host memory: "bfloat16", "float16" or "float32"."""
        return self._weights_dtype or getattr(self.backend, "weights_dtype", "float32")

    @property
    def source(self) -> str:
        """Where the weights came from: the GGUF file or the model folder (for logs and reports)."""
        return str(self.gguf_path or self.folder)

    @property
    def has_tokenizer(self) -> bool:
        """Whether the model has a tokenizer: a folder's tokenizer.json, or a GGUF file's vocabulary."""
        return self._tokenizer is not None or self._tokenizer_loader is not None or \
            (self.folder is not None and (self.folder / "tokenizer.json").exists())

    @property
    def tokenizer(self):
        """The model's tokenizer (tokenizer.json in the model folder, or the GGUF file's own vocabulary);
        CheckpointError when there is none."""
        if self._tokenizer is None:
            if self._tokenizer_loader is not None:
                tokenizer = self._tokenizer_loader()
            elif self.folder is None or not (self.folder / "tokenizer.json").exists():
                raise CheckpointError(f"{self.folder}: no tokenizer.json in the model folder")
            else:
                tokenizer = Tokenizer.from_folder(self.folder)
            if self._chat_template is not None:
                tokenizer.use_chat_template(self._chat_template)
            self._tokenizer = tokenizer
        return self._tokenizer

    def use_chat_template(self, template) -> None:
        """Chat with `template` instead of the model's own (or where it has none): a name ("chatml", "zephyr",
        "llama-2"), a Jinja file's path, Jinja text, or a ChatTemplate. EngineError when it is none of these."""
        self._chat_template = resolve_chat_template(template)
        if self._tokenizer is not None:
            self._tokenizer.use_chat_template(self._chat_template)

    def new_cache(self):
        """An empty KV cache for one sequence on this model's backend."""
        return self.backend.new_cache()

    def forward(self, steps: list[SequenceStep]) -> list[np.ndarray]:
        """The ragged batch forward (see engine.runtime.batch): per step logits, float32."""
        return self.backend.forward(steps)

    def logits(self, token_ids) -> np.ndarray:
        """Logits for every position of one prompt. token_ids: (T,) ints -> (T, vocab) float32."""
        return self.forward([SequenceStep(self.new_cache(), token_ids, all_logits=True)])[0]

    def trace(self, prompt, attentions: bool = False, hidden_states: bool = False, layers=None,
              max_bytes: int = TRACE_MEMORY_LIMIT) -> Trace:
        """One forward pass over `prompt` (text or ids) that records what is asked -> Trace (engine.runtime.trace).

        Trace.token_ids (T,), logits (T, vocab); attentions: per layer (n_heads, T, T) post-softmax probabilities
        (transformers' output_attentions under eager attention); hidden_states: L + 1 arrays (T, hidden),
        transformers' output_hidden_states ([0] embeddings, [i] after layer i-1, [L] after the final norm).
        layers: indices 0..L (negative from the end) to record, None for all. EngineError (one line) when the trace
        would hold more than `max_bytes` (default 4 GiB), or on a backend other than numpy.
        """
        if not isinstance(self.backend, NumpyBackend):
            raise EngineError(f"trace runs on the numpy backend only (this model runs on {self.backend.name}); "
                              "load it with backend='numpy'")
        ids = self.prompt_ids(prompt)
        if not ids:
            raise EngineError("cannot trace an empty prompt")
        recorder = TraceRecorder(self.config, len(ids), attentions, hidden_states, layers, max_bytes)
        step = SequenceStep(self.new_cache(), ids, all_logits=True)
        logits = self.backend.forward([step], recorder=recorder)[0]
        return recorder.result(step.token_ids, logits)

    def prompt_ids(self, prompt) -> list[int]:
        """A prompt as token ids: text is encoded with the model's tokenizer (BOS added), ids pass through."""
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, **options) -> list[int]:
        """The new token ids (not the prompt) generated after `prompt` (ids or text); options as in `complete`."""
        return self.complete(prompt, max_new_tokens=max_new_tokens, temperature=temperature, **options).token_ids

    def complete(self, prompt, **options):
        """Generate after `prompt` -> GenerationResult (token_ids, text, stop_reason, timings).

        Options: max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
        frequency_penalty, seed, stop (str or list), ignore_eos, logprobs (N: each token's log-probability and the
        top N in `result.logprobs`), speculate (most draft tokens per step), draft ("lookup", "int8", "int4": where
        the drafts come from; the output is plain decoding's either way), truncate; defaults from
        generation_config.json.
        """
        return generate(self, self.prompt_ids(prompt), **options)

    def stream(self, prompt, cache=None, speculate: int = 0, truncate: bool = False, draft="lookup", draft_cache=None,
               **options):
        """Streaming form of `complete`: iterate for TokenEvents (token_id, text); `.result` afterwards. `cache` /
        `draft_cache` may hold a prefix of the prompt (a conversation's), only the rest is prefilled."""
        return Generation(self, self.prompt_ids(prompt), default_options(self, **options), cache=cache,
                          speculate=speculate, truncate=truncate, draft=draft, draft_cache=draft_cache)

    def generate_batch(self, prompts, **options) -> list:
        """Several prompts (ids or text) at once, one batched forward per step -> list of GenerationResult."""
        return generate_batch(self, [self.prompt_ids(p) for p in prompts], **options)


def load_model(ref: str = DEFAULT_MODEL, backend: str = "numpy", revision: str | None = None,
               weights_dtype: str = "auto", gguf_file: str | None = None, chat_template=None,
               **backend_options) -> Model:
    """Load a Llama checkpoint (local folder or Hub repo id, or a GGUF file) onto `backend` ("numpy" or "triton").

    weights_dtype: "auto" keeps a bf16/fp16 checkpoint's matrices 16-bit where the backend's kernels widen them exactly
    (the NumPy backend's compiled kernels, the Triton kernels), else float32; "float32" widens them at load;
    "int8" / "int4" quantize them at load, groups of 32 with float16 scales; "q4_k_m" into llama.cpp's q4_K_M mix by
    our quantizer (NumPy backend only; inexact modes: docs/weights.md, docs/kquant.md).
    A GGUF file (`ref` a path ending in .gguf, or `ref` a Hub repo id / folder and `gguf_file` the file's name in it)
    runs its tensors in their own ggml types (auto; see docs/gguf.md) or dequantized to float32 ("float32").
    chat_template: chat with this template instead of the model's own, or where it has none (see
    Model.use_chat_template); checked before anything loads."""
    template = resolve_chat_template(chat_template) if chat_template is not None else None
    model = _load_model(ref, backend, revision, weights_dtype, gguf_file, **backend_options)
    if template is not None:
        model.use_chat_template(template)
    return model


def _load_model(ref: str, backend: str, revision: str | None, weights_dtype: str, gguf_file: str | None,
                **backend_options) -> Model:
    """load_model without the chat template."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if gguf_file is not None or is_gguf_path(ref):
        return load_gguf_model(resolve_gguf_file(ref, gguf_file, revision), backend, weights_dtype, **backend_options)
    if (lone := folder_gguf(ref)) is not None:
        return load_gguf_model(lone, backend, weights_dtype, **backend_options)
    folder = resolve_model_folder(ref, revision)
    raw_config, checkpoint = open_checkpoint(folder)
    with checkpoint:
        config = ModelConfig.from_dict(raw_config, source=str(folder / "config.json"))
        if backend != "numpy" and weights_dtype in ("int8", "int4", "q4_k_m"):
            raise EngineError(f"weights_dtype={weights_dtype} runs on the numpy backend only (its compiled kernels); "
                              f"the {backend} backend takes auto, float32, bfloat16 or float16")
        kernels = native.status() if backend == "numpy" else native.NativeStatus(True, backend)
        stored = stored_dtype(checkpoint, config)
        if backend == "numpy" and (notice := native.fallback_notice(stored)):
            print(notice, file=sys.stderr)  # once per process: why the kernels are missing and what that costs
        dtype, reason = choose_weights_dtype(weights_dtype, stored, kernels.available, kernels.detail)
        if dtype in kquant_mix.MIXES:  # its quantizer weighs columns by the activations of the exact model
            exact, _ = choose_weights_dtype("auto", stored, kernels.available, kernels.detail)
            weights = load_model_weights(
                checkpoint, config, dtype,
                importance=lambda: calibration.activation_importance(config, load_model_weights(checkpoint, config,
                                                                                                 exact)),
                importance_settings=calibration.settings())
        else:
            weights = load_model_weights(checkpoint, config, dtype)
    generation_config = _generation_config(folder)
    if backend == "numpy":
        impl = NumpyBackend(config, weights, **backend_options)
    else:
        from tinyllama_kernels.triton_backend import TritonBackend

        impl = TritonBackend(config, weights, **backend_options)
        if (notice := interpreter_notice(impl)) is not None:
            print(notice, file=sys.stderr)  # once per process, like the compiled kernels' fallback
    return Model(config, impl, folder=folder, generation_config=generation_config,
                 weights_dtype=dtype, weights_dtype_reason=reason)


_interpreter_noticed = False
INTERPRETER_NOTICE = ("tinyllama: no CUDA GPU: the triton backend runs in Triton's CPU interpreter, at a small "
                      "fraction of the numpy backend's speed (~1/1000 or less: for testing the kernels; use "
                      "--backend numpy)")


def interpreter_notice(backend) -> str | None:
    """The one line a model load prints on stderr when the Triton backend runs in Triton's CPU interpreter (no CUDA
    GPU), the first time only; None on a GPU, or after the first."""
    global _interpreter_noticed
    if _interpreter_noticed or not getattr(getattr(backend, "target", None), "interpret", False):
        return None
    if getattr(getattr(backend, "device", None), "type", "cpu") == "meta":
        return None  # recording launches for a named GPU (tinyllama_kernels.aot): nothing runs
    _interpreter_noticed = True
    return INTERPRETER_NOTICE


GGUF_WEIGHTS_DTYPES = ("auto", "float32")


def load_gguf_model(path: Path, backend: str = "numpy", weights_dtype: str = "auto", **backend_options) -> Model:
    """Load a GGUF file: config and tokenizer from its metadata, each tensor in its ggml type (engine.runtime.
    ggml_formats; weights_dtype="float32": every matrix dequantized to float32). A file whose repacked weights are
    cached (engine.runtime.gguf_weights.load_cached) is not read at all: weights, config and tokenizer come from the
    mapped entry. NumPy backend; CheckpointError (one line) for anything wrong with the file, EngineError for
    options a GGUF model does not take."""
    from engine.runtime import gguf_weights
    from engine.runtime.ggml_formats import UnsupportedTypeError
    from engine.text import gguf_tokenizer

    if backend != "numpy":
        raise EngineError(f"a GGUF file runs on the numpy backend (its compiled kernels), not {backend}")
    if weights_dtype not in GGUF_WEIGHTS_DTYPES:
        raise EngineError(f"weights_dtype={weights_dtype} does not apply to a GGUF file: its tensors run in their own "
                          f"types (auto), or dequantized to float32 (float32)")
    path = Path(path)
    kernels = native.status()
    if notice := native.fallback_notice("bfloat16"):
        print(notice, file=sys.stderr)
    widen = weights_dtype == "float32" or not kernels.available
    cached = None if widen else gguf_weights.load_cached(path)
    if cached is not None:
        config, weights, extra = cached
        label = extra.get("label", "")
        built = extra.get("tokenizer")
        meta = None
    else:
        with GGUFFile(path) as f:
            config = ModelConfig.from_dict(f.config_dict(), source=str(path))
            meta = f.tokenizer_metadata()
            label = f.dtype_label()
            ready = None
            try:  # built now so that the cache keeps it (a later load then skips the vocabulary's merges)
                hf, facts = gguf_tokenizer.build(meta)
                built = {"json": hf.to_str(), "facts": facts}
                ready = Tokenizer(hf, **facts)  # the model's: built once
                meta = None  # the vocabulary's lists are not needed again
            except gguf_tokenizer.GGUFTokenizerError:
                built = None  # an error on first use of the tokenizer; ids still run
            try:
                weights = gguf_weights.load_gguf_weights(f, config, widen=widen,
                                                         extra={"label": label, "tokenizer": built})
            except UnsupportedTypeError as e:
                raise CheckpointError(f"{path}: {e}") from None

    def tokenizer() -> Tokenizer:
        """The file's tokenizer: as built at the first load, or built from its metadata now."""
        if built is not None:
            from tokenizers import Tokenizer as HFTokenizer

            return Tokenizer(HFTokenizer.from_str(built["json"]), **built["facts"])
        try:
            return Tokenizer.from_gguf_metadata(meta)
        except gguf_tokenizer.GGUFTokenizerError as e:
            raise CheckpointError(f"{path}: {e}") from None

    reason = (f"the GGUF file's own types ({label or weights.dtype})" if not widen else
              "dequantized to float32 at load" + ("" if weights_dtype == "float32" else
                                                  f": the compiled kernels are not available ({kernels.detail})"))
    model = Model(config, NumpyBackend(config, weights, **backend_options), folder=None, weights_dtype=weights.dtype,
                  weights_dtype_reason=reason, gguf_path=path, tokenizer_loader=tokenizer)
    if cached is None:
        model._tokenizer = ready
    return model


def share_equal_arrays(source, target) -> int:
    """Point every weight array of `target` (ModelWeights, walked through its layers) that equals the array in the
    same place of `source` (same dtype, shape and values) at the source's array, so the two models hold it once.
    Returns the bytes saved."""
    saved = 0
    pairs = [(source, target)] + list(zip(getattr(source, "layers", []), getattr(target, "layers", [])))
    for src, dst in pairs:
        for name, value in list(vars(dst).items()):
            mine = getattr(src, name, None)
            if (isinstance(value, np.ndarray) and isinstance(mine, np.ndarray) and value is not mine
                    and value.dtype == mine.dtype and value.shape == mine.shape and np.array_equal(value, mine)):
                setattr(dst, name, mine)
                saved += value.nbytes
    return saved


def _generation_config(folder: Path) -> dict:
    path = folder / "generation_config.json"
    return read_json(path) if path.exists() else {}
