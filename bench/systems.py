"""The systems a benchmark compares, behind one small interface the worker times.

A runner: `prepare()` (untimed: format conversion); `load()`; `prefill(ids) -> first token` (a fresh sequence each
call); `decode_setup(batch, ids)` prefills `batch` copies of the prompt; `decode_reset()` cuts every sequence back to
the prompt; `decode_step()` adds one greedy token to every sequence in one batched forward. `weight_bytes` (all
weights), `decode_bytes` (what a decode step reads: bench.roofline.decode_bytes) and `info()` describe it. Imports are lazy: a worker only loads the libraries of the one system it runs.
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from engine.compare import transformers_step

ENGINE_BACKENDS = ("numpy", "triton")
ENGINE_ISAS = ("avx512", "avx2", "portable")
TRANSFORMERS_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
LLAMACPP_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_K_M")
LLAMACPP_FILE = "llama.cpp"  # llama.cpp on the --model GGUF file itself (the one file both systems load)
ENGINE_WEIGHTS = ("float32", "int8", "int4", "q4_k_m")  # beside auto (the checkpoint's own dtype)
DRAFT_SUFFIX = "draft"  # engine-numpy-draft-int8: batch-1 decode with speculation from the int8 copy
NO_DRAFT = "none"  # engine-numpy-draft-none: the same generation loop without speculation (its plain baseline)
_LOADED: dict = {}  # (folder, backend, weights_dtype) -> Model: the systems of one process share a loaded model


class Unavailable(Exception):
    """The system cannot run here (library not installed, no GPU): a note in the results, not a failure."""


def system_names(engine_backends) -> list[str]:
    """Every system name, in the order results list them."""
    return ([f"engine-{b}" for b in engine_backends] + [f"transformers-{d}" for d in TRANSFORMERS_DTYPES]
            + [f"llama.cpp-{t}" for t in LLAMACPP_TYPES])


def engine_parts(name: str) -> tuple[str, str | None, str]:
    """(backend, forced kernel variant or None, weights_dtype) of an engine system name: engine-numpy,
    engine-numpy-avx2, engine-numpy-float32, engine-numpy-portable-int4 (a draft's kind is not the weights)."""
    parts = name.split("-")[1:]
    if DRAFT_SUFFIX in parts:
        parts = parts[: parts.index(DRAFT_SUFFIX)]
    backend = parts[0]
    isa = next((p for p in parts[1:] if p in ENGINE_ISAS), None)
    weights = next((p for p in parts[1:] if p in ENGINE_WEIGHTS), "auto")
    return backend, isa, weights


def engine_draft(name: str) -> str | None:
    """The draft of an engine system name that speculates (engine-numpy-draft-int8 -> "int8"), else None."""
    parts = name.split("-")
    return parts[parts.index(DRAFT_SUFFIX) + 1] if DRAFT_SUFFIX in parts[:-1] else None


def describe(name: str) -> dict:
    """system / backend / dtype fields of a system name (engine-numpy, transformers-bf16, llama.cpp-q8_0); an engine's
    dtype is what it holds its weights in, known once it has loaded them (`auto` until then)."""
    family, _, variant = name.partition("-")
    if name == LLAMACPP_FILE:
        return {"system": "llama.cpp", "backend": "llama-cpp-python", "dtype": "gguf"}
    if family == "engine":
        backend, _, weights = engine_parts(name)
        return {"system": "tinyllama-engine", "backend": backend, "dtype": weights}
    if family == "transformers":
        return {"system": "transformers", "backend": "torch-sdpa", "dtype": TRANSFORMERS_DTYPES[variant]}
    return {"system": "llama.cpp", "backend": "llama-cpp-python", "dtype": variant}


def model_config(source: str) -> dict:
    """The config.json dict of a checkpoint folder, or of a GGUF file (from its metadata)."""
    from weights.checkpoint import read_json
    from weights.gguf_file import GGUFFile, is_gguf_path

    if is_gguf_path(str(source)):
        with GGUFFile(source) as f:
            return f.config_dict()
    return read_json(Path(source) / "config.json")


def make_runner(name: str, folder: str, threads: int):
    if name == LLAMACPP_FILE:
        return LlamaCppRunner(folder, "", threads)
    family, _, variant = name.partition("-")
    if family == "engine":
        draft = engine_draft(name)
        if draft is not None:
            return SpeculativeEngineRunner(folder, *engine_parts(name), draft=draft)
        return EngineRunner(folder, *engine_parts(name))
    if family == "transformers":
        return TransformersRunner(folder, TRANSFORMERS_DTYPES[variant], threads)
    if family == "llama.cpp":
        return LlamaCppRunner(folder, variant, threads)
    raise ValueError(f"unknown system {name!r}")


def argmax_rows(logits) -> list[int]:
    import numpy as np

    return [int(i) for i in np.argmax(logits, axis=-1).reshape(-1)]


class Runner:
    room = 2048  # tokens per sequence the runs need (the worker sets it)

    def prepare(self):
        pass


class EngineRunner(Runner):
    def __init__(self, folder: str, backend: str, isa: str | None = None, weights_dtype: str = "auto"):
        self.folder, self.backend_name, self.isa, self.weights_dtype = folder, backend, isa, weights_dtype
        self.caches, self.next_tokens, self.prompt_len = [], [], 0
        if isa:  # each system runs in its own worker process: the variant is chosen before the kernels load
            os.environ["TINYLLAMA_NATIVE_ISA"] = isa

    def load(self):
        import engine  # noqa: F401  (chooses OpenBLAS's kernel before NumPy loads)
        from engine.runtime import native
        from engine.runtime.batch import SequenceStep

        if self.isa and not native.status().available:
            raise Unavailable(f"the {self.isa} kernel variant cannot run here: {native.status().detail}")

        if self.backend_name == "triton":
            if importlib.util.find_spec("triton") is None:
                raise Unavailable("triton is not installed")
            try:
                import torch

                if not torch.cuda.is_available():
                    raise Unavailable("no GPU (torch.cuda.is_available() is False)")
            except ImportError:
                raise Unavailable("torch is not installed") from None
            try:
                import tinyllama_kernels.triton_backend  # noqa: F401
            except ImportError as e:
                raise Unavailable(f"tinyllama_kernels.triton_backend does not import ({e})") from None
        self.Step = SequenceStep
        key = (self.folder, self.backend_name, self.weights_dtype)  # bench.interleave: several systems, one model
        if key not in _LOADED:
            _LOADED[key] = engine.load_model(self.folder, backend=self.backend_name, weights_dtype=self.weights_dtype)
        self.model = _LOADED[key]
        self.dtype = self.model.weights_dtype
        self.weight_bytes = int(self.model.backend.weights.nbytes)
        self.decode_bytes = int(self.model.backend.weights.decode_bytes())
        self.weight_count = int(self.model.config.weight_count())

    def prefill(self, ids) -> int:
        logits = self.model.forward([self.Step(self.model.new_cache(), ids)])[0]
        return argmax_rows(logits[-1])[0]

    def decode_setup(self, batch: int, ids):
        self.caches = [self.model.new_cache() for _ in range(batch)]
        logits = self.model.forward([self.Step(c, ids) for c in self.caches])
        self.first_tokens = [argmax_rows(lg[-1])[0] for lg in logits]
        self.prompt_len = len(ids)
        self.decode_reset()

    def decode_reset(self):
        for c in self.caches:
            c.truncate(self.prompt_len)
        self.next_tokens = list(self.first_tokens)

    def decode_step(self):
        logits = self.model.forward([self.Step(c, [t]) for c, t in zip(self.caches, self.next_tokens)])
        self.next_tokens = [argmax_rows(lg[-1])[0] for lg in logits]

    def speculative(self, passage: list[int], new_tokens: int, draft: int, source: str = "lookup") -> dict:
        """Batch-1 greedy decoding, plain and speculative with up to `draft` tokens per step from `source`: prompt
        lookup (on a prompt that asks to repeat a passage) or the model's own int8 / int4 copy (on the passage)."""
        prompt = passage + passage[: len(passage) // 8] if source == "lookup" else list(passage)
        plain = self.model.complete(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        fast = self.model.complete(prompt, max_new_tokens=new_tokens, ignore_eos=True, speculate=draft, draft=source)
        if fast.token_ids != plain.token_ids:
            raise RuntimeError("speculative decoding changed the greedy output")
        one_s, verify_s = self.verify_cost(prompt, draft)
        out = {"plain_tok_s": plain.generated_tokens_per_s, "speculative_tok_s": fast.generated_tokens_per_s,
               "acceptance_rate": fast.acceptance_rate, "draft_tokens": draft, "prompt_tokens": len(prompt),
               "step_s": one_s, "verify_step_s": verify_s, "draft": source,
               "draft_steps": fast.draft_steps, "plain_steps": fast.plain_steps}
        if source != "lookup":
            kind = source.split("+")[0]
            out["draft_step_s"] = step_cost(self.model.draft_model(kind), prompt)
        return out

    def verify_cost(self, prompt: list[int], draft: int, trials: int = 3) -> tuple[float, float]:
        """Seconds of a decode step of 1 token and of a verification step of 1 + `draft` tokens (every position's
        logits) at the same cache position after `prompt`, best of `trials`: what a step of drafts costs."""
        from engine.runtime.batch import SequenceStep

        cache = self.model.new_cache()
        self.model.forward([SequenceStep(cache, prompt)])
        length, one, verify = cache.length, [], []
        for _ in range(trials):
            for tokens, times in (([prompt[-1]], one), (prompt[-draft - 1:], verify)):
                t0 = time.perf_counter()
                self.model.forward([SequenceStep(cache, tokens, all_logits=len(tokens) > 1)])
                times.append(time.perf_counter() - t0)
                cache.truncate(length)
        return min(one), min(verify)

    def info(self) -> dict:
        from engine.runtime import native
        from engine.runtime.blas import blas_info
        from engine.runtime.layers import matmul_kernel_name

        if self.backend_name == "numpy":
            return {"kernel": matmul_kernel_name(self.model.weights_dtype), "blas": blas_info(),
                    "native_kernels": native.status().detail, "native_variant": native.status().isa,
                    "native_reason": native.summary()["reason"],
                    "weights_dtype": self.model.weights_dtype, "weights_dtype_reason": self.model.weights_dtype_reason}
        import torch

        return {"kernel": "triton", "gpu": torch.cuda.get_device_name(0)}


def step_cost(model, prompt: list[int], rows: int = 1, trials: int = 3) -> float:
    """Seconds of one forward of `rows` tokens after `prompt` on `model` (an engine Model), best of `trials`."""
    from engine.runtime.batch import SequenceStep

    cache = model.new_cache()
    model.forward([SequenceStep(cache, prompt)])
    length, times = cache.length, []
    for _ in range(trials):
        t0 = time.perf_counter()
        model.forward([SequenceStep(cache, prompt[-rows:], all_logits=rows > 1)])
        times.append(time.perf_counter() - t0)
        cache.truncate(length)
    return min(times)


class SpeculativeEngineRunner(EngineRunner):
    """Batch-1 greedy decoding with speculation from the model's own `draft` copy (int8, int4, int8+lookup, ...) or
    prompt lookup, timed as bench.interleave times a decode block: `decode_block(tokens)` -> seconds for `tokens`
    new tokens after the first, the prompt's caches (the model's and the draft's) kept between blocks as a chat keeps
    them. Draft "none": the same loop (Generation, sampling, text) without speculation, the fair plain baseline."""

    speculate = 4  # most draft tokens per step (bench.interleave --speculate sets it)
    check_tokens = 32  # greedy tokens compared with plain decoding at setup (must be identical)

    def __init__(self, folder: str, backend: str, isa: str | None = None, weights_dtype: str = "auto",
                 draft: str = "int8"):
        super().__init__(folder, backend, isa, weights_dtype)
        self.draft = draft
        self.stats = []  # per block: (drafted, accepted, tokens, drafting steps, plain steps)

    def load(self):
        super().load()
        kind = self.draft.split("+")[0]
        self.draft_model = self.model.draft_model(kind) if kind not in ("lookup", NO_DRAFT) else None
        if self.draft_model is not None:
            self.weight_bytes += int(self.draft_model.backend.weights.nbytes)

    def decode_setup(self, batch: int, ids):
        from engine.runtime.batch import SequenceStep

        if batch != 1:
            raise Unavailable("speculative rows run at batch 1")
        self.ids = [int(t) for t in ids]
        self.cache = self.model.new_cache()
        self.model.forward([SequenceStep(self.cache, self.ids[:-1])])
        self.draft_cache = None
        if self.draft_model is not None:
            self.draft_cache = self.draft_model.new_cache()
            self.draft_model.forward([SequenceStep(self.draft_cache, self.ids[:-1])])
        plain = self.model.generate(self.ids, max_new_tokens=self.check_tokens, ignore_eos=True, temperature=0.0,
                                    repetition_penalty=1.0)
        fast = self.generate(self.check_tokens - 1).token_ids
        if fast != plain:
            raise RuntimeError(f"speculation with the {self.draft} draft changed the greedy output")
        self.identical_tokens = len(plain)

    def generate(self, tokens: int):
        """`tokens` + 1 greedy tokens after the prompt (speculating) -> GenerationResult."""
        from engine.generation.generate import Generation
        from engine.generation.state import default_options

        self.cache.truncate(len(self.ids) - 1)
        if self.draft_cache is not None:
            self.draft_cache.truncate(min(self.draft_cache.length, len(self.ids) - 1))
        options = default_options(self.model, max_new_tokens=tokens + 1, ignore_eos=True, temperature=0.0,
                                  repetition_penalty=1.0)
        plain = self.draft == NO_DRAFT
        gen = Generation(self.model, self.ids, options, cache=self.cache, speculate=0 if plain else self.speculate,
                         draft="lookup" if plain else self.draft, draft_cache=self.draft_cache)
        for _ in gen:
            pass
        return gen.result

    def decode_block(self, tokens: int) -> float:
        """Seconds for `tokens` tokens after the first (whose step is a plain one)."""
        r = self.generate(tokens)
        self.stats.append((r.draft_tokens, r.accepted_draft_tokens, len(r.token_ids), r.draft_steps, r.plain_steps))
        return r.decode_seconds

    def decode_reset(self):
        pass

    def decode_step(self):
        self.generate(1)

    def info(self) -> dict:
        out = super().info()
        drafted = sum(s[0] for s in self.stats)
        out.update(draft=self.draft, speculate=self.speculate, identical_tokens=getattr(self, "identical_tokens", 0),
                   acceptance_rate=sum(s[1] for s in self.stats) / drafted if drafted else None,
                   draft_steps=sum(s[3] for s in self.stats), plain_steps=sum(s[4] for s in self.stats))
        if self.draft_model is not None:
            from engine.runtime.layers import matmul_kernel_name

            out["kernel"] += f" + {self.draft} draft ({matmul_kernel_name(self.draft_model.weights_dtype)})"
        return out


class TransformersRunner(Runner):
    def __init__(self, folder: str, dtype: str, threads: int):
        self.folder, self.dtype_name, self.threads = folder, dtype, threads

    def load(self):
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            raise Unavailable("torch / transformers are not installed")
        from weights.gguf_file import is_gguf_path

        if is_gguf_path(str(self.folder)):
            raise Unavailable("transformers runs a checkpoint folder, not a GGUF file")
        import torch
        import transformers

        torch.set_num_threads(self.threads)
        self.torch = torch
        self.model = transformers.LlamaForCausalLM.from_pretrained(
            self.folder, dtype=getattr(torch, self.dtype_name), attn_implementation="sdpa").eval()
        from bench.roofline import decode_bytes

        self.weight_bytes = int(sum(p.numel() * p.element_size() for p in self.model.parameters()))
        self.weight_count = int(sum(p.numel() for p in self.model.parameters()))
        embed = self.model.get_input_embeddings().weight
        tied = self.model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
        self.decode_bytes = decode_bytes(self.weight_bytes, embed.numel() * embed.element_size(), tied)

    def _forward(self, ids, cache=None):
        with self.torch.inference_mode():
            out, cache = transformers_step(self.model, ids, cache, logits_to_keep=1)
        return cache, out.logits[:, -1].argmax(-1)

    def prefill(self, ids) -> int:
        _, tok = self._forward(self.torch.tensor([list(ids)]))
        return int(tok[0])

    def decode_setup(self, batch: int, ids):
        self.cache, first = self._forward(self.torch.tensor([list(ids)] * batch))
        self.first_tokens = first.view(batch, 1)
        self.prompt_len = len(ids)
        self.decode_reset()

    def decode_reset(self):
        extra = self.cache.get_seq_length() - self.prompt_len
        if extra > 0:
            self.cache.crop(-extra)  # a negative count removes that many tokens (transformers 4.x and 5.x alike)
        self.next_tokens = self.first_tokens

    def decode_step(self):
        self.cache, tok = self._forward(self.next_tokens, self.cache)
        self.next_tokens = tok.view(-1, 1)

    def info(self) -> dict:
        torch = self.torch
        return {"kernel": f"torch {torch.__version__} cpu={torch.backends.cpu.get_cpu_capability()}",
                "torch_threads": torch.get_num_threads()}


class LlamaCppRunner(Runner):
    """llama.cpp through llama-cpp-python's low-level API (batched decode needs one sequence id per row)."""

    def __init__(self, folder: str, outtype: str, threads: int):
        self.folder, self.outtype, self.threads = folder, outtype, threads
        self.ctx = None

    def prepare(self):
        """Convert the checkpoint to GGUF (cached; not part of the load time); a GGUF --model is used as it is."""
        from bench import llamacpp
        from weights.gguf_file import is_gguf_path

        if not llamacpp.installed():
            raise Unavailable("llama-cpp-python is not installed (pip install llama-cpp-python)")
        if is_gguf_path(str(self.folder)):
            if self.outtype:
                raise Unavailable(f"llama.cpp-{self.outtype} converts a checkpoint folder; with a GGUF --model run "
                                  f"system {LLAMACPP_FILE} (the file itself)")
            self.gguf = self.folder
            return
        if not self.outtype:
            raise Unavailable(f"system {LLAMACPP_FILE} runs a GGUF --model; for a checkpoint folder name the type "
                              f"(llama.cpp-q8_0, ...)")
        self.gguf = llamacpp.gguf_for(self.folder, self.outtype)

    def load(self):
        import llama_cpp as L

        self.L = L
        from bench.llamacpp import amx_build

        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.extra_bufts = True
        if hasattr(mp, "use_extra_bufts") and amx_build():  # the AMX / repack layouts crash this build
            mp.use_extra_bufts = self.extra_bufts = False
        load = getattr(L, "llama_model_load_from_file", None) or L.llama_load_model_from_file
        self.model = load(str(self.gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.gguf}")
        vocab_of = getattr(L, "llama_model_get_vocab", None)
        self.n_vocab = (L.llama_vocab_n_tokens(vocab_of(self.model)) if vocab_of else L.llama_n_vocab(self.model))
        from bench.llamacpp import gguf_tensor_bytes
        from bench.roofline import decode_bytes

        self.weight_bytes = int(L.llama_model_size(self.model))
        self.weight_count = int(L.llama_model_n_params(self.model))
        tensors = gguf_tensor_bytes(self.gguf)  # tied embeddings: no output.weight, token_embd is the lm_head
        self.decode_bytes = decode_bytes(self.weight_bytes, tensors["token_embd.weight"], "output.weight" not in tensors)
        self.ctx_batch = 0

    def _context(self, n_seq: int, n_ctx: int):
        L = self.L
        if self.ctx is not None and self.ctx_batch >= n_seq and self.ctx_len >= n_ctx:
            self._clear()
            return
        if self.ctx is not None:
            L.llama_free(self.ctx)
        p = L.llama_context_default_params()
        p.n_ctx = n_ctx * n_seq
        p.n_batch = p.n_ubatch = min(512, n_ctx * n_seq)
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = self.threads
        init = getattr(L, "llama_init_from_model", None) or L.llama_new_context_with_model
        self.ctx = init(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.ctx_batch, self.ctx_len = n_seq, n_ctx
        self._clear()

    def _clear(self):
        self._seq_rm(-1, 0, -1)

    def _seq_rm(self, seq: int, p0: int, p1: int):
        L = self.L
        if hasattr(L, "llama_get_memory"):
            L.llama_memory_seq_rm(L.llama_get_memory(self.ctx), seq, p0, p1)
        elif hasattr(L, "llama_kv_self_seq_rm"):
            L.llama_kv_self_seq_rm(self.ctx, seq, p0, p1)
        else:
            L.llama_kv_cache_seq_rm(self.ctx, seq, p0, p1)

    def _decode(self, rows) -> list[int]:
        """rows: (seq, position, token, wants_logits) -> argmax tokens of the rows that want logits."""
        import numpy as np

        L = self.L
        out = []
        for start in range(0, len(rows), self.n_batch):
            chunk = rows[start:start + self.n_batch]
            batch = L.llama_batch_init(len(chunk), 0, 1)
            try:
                for i, (seq, pos, tok, want) in enumerate(chunk):
                    batch.token[i], batch.pos[i] = tok, pos
                    batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, seq, bool(want)
                batch.n_tokens = len(chunk)
                rc = L.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
                for i, (_, _, _, want) in enumerate(chunk):
                    if want:
                        ptr = L.llama_get_logits_ith(self.ctx, i)
                        out.append(int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))))
            finally:
                L.llama_batch_free(batch)
        return out

    @property
    def n_batch(self) -> int:
        return min(512, self.ctx_len * self.ctx_batch)

    def prefill(self, ids) -> int:
        if self.ctx is None or self.ctx_len < len(ids):
            self._context(max(1, self.ctx_batch), max(self.room, len(ids)))
        self._clear()
        n = len(ids)
        return self._decode([(0, p, int(t), p == n - 1) for p, t in enumerate(ids)])[0]

    def decode_setup(self, batch: int, ids):
        self._context(batch, max(self.room, len(ids) + 64))
        n = len(ids)
        self.first_tokens = self._decode([(s, p, int(t), p == n - 1) for s in range(batch) for p, t in enumerate(ids)])
        self.batch, self.prompt_len = batch, n
        self.decode_reset()

    def decode_reset(self):
        for s in range(self.batch):
            self._seq_rm(s, self.prompt_len, -1)
        self.next_tokens, self.position = list(self.first_tokens), self.prompt_len

    def decode_step(self):
        self.next_tokens = self._decode([(s, self.position, t, True) for s, t in enumerate(self.next_tokens)])
        self.position += 1

    def info(self) -> dict:
        L = self.L
        system_info = L.llama_print_system_info().decode(errors="replace").strip()
        on = [kv.split("=")[0].strip() for kv in system_info.replace("|", "\n").splitlines()
              if kv.strip().endswith("= 1")]
        features = [f for f in on if f.startswith(("AVX", "AMX", "NEON", "SVE", "FMA", "F16C"))]
        return {"kernel": "ggml " + (",".join(features) or "cpu")
                + ("" if self.extra_bufts else " (AMX/repack buffers off: they crash this build)"),
                "system_info": system_info, "extra_bufts": self.extra_bufts,
                "llama_cpp_version": getattr(L, "__version__", None), "gguf": str(self.gguf)}


def threads_env(threads: int) -> dict:
    """Environment for a worker: every thread pool sized to `threads`."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env
