"""This engine against transformers on the same weights, as a report a user can print or assert on in a test.

`compare_with_transformers(ref, prompts, steps)` runs both systems on each prompt: the logits at every prompt position
and at every greedy step (the engine's decode path, one token per forward through its KV cache, fed transformers'
greedy tokens so both see the same context), and each system's own greedy tokens. `tinyllama check` prints the
report; a test can assert `report.ok` or look at the figures. torch and transformers are imported only when called.

Fidelity, for the inexact modes (int8 / int4 weights) and reported for every mode: along transformers' greedy path
(teacher-forced) the share of positions where both systems' top token agrees and KL(transformers || engine) per
token (mean, max); how many greedy tokens agree before the first difference; with a text, the perplexity of both and
the same agreement and KL over every position of it. An exact mode (float32, the checkpoint's 16-bit dtype) keeps
the strict check (1e-3 of the logit scale, greedy identical); an inexact one passes or fails on the thresholds given
(`min_agreement`, `max_kl` on the mean KL), so a CI job can guard a quantized model.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from engine.model import Model, load_model
from engine.runtime import native
from engine.runtime.batch import SequenceStep

TOLERANCE = 1e-3  # relative to the logit scale; the test suite holds the NumPy backend to 1e-4
DEFAULT_PROMPT = "The capital of France is"
EXACT_WEIGHTS = ("float32", "bfloat16", "float16")  # held so that the logits are transformers' fp32 logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64: (T, vocab) -> (T, vocab)."""
    x = np.asarray(logits, dtype=np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))


def kl_per_row(reference: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(ours)) per row, float64 nats: (T, vocab) x 2 -> (T,)."""
    ref, mine = log_softmax(reference), log_softmax(ours)
    return np.maximum(0.0, (np.exp(ref) * (ref - mine)).sum(axis=-1))


def perplexity(logits: np.ndarray, ids) -> float:
    """exp(mean negative log-likelihood) of ids[1:] under logits rows 0..T-2: logits (T, vocab), ids (T,)."""
    ids = np.asarray(ids)
    lp = log_softmax(logits[:-1])
    return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))


@dataclass
class Fidelity:
    """How close the engine's next-token distributions are to transformers' over `positions` teacher-forced rows."""

    positions: int
    top1_agreement: float  # share of rows whose argmax agrees
    kl_mean: float  # mean KL(transformers || engine), nats per token
    kl_max: float

    @classmethod
    def of(cls, reference: np.ndarray, ours: np.ndarray) -> "Fidelity":
        """From two (T, vocab) logits arrays over the same rows."""
        kl = kl_per_row(reference, ours)
        agree = float(np.mean(reference.argmax(axis=-1) == ours.argmax(axis=-1)))
        return cls(len(kl), agree, float(kl.mean()), float(kl.max()))


@dataclass
class TextComparison:
    """Both systems over one text (teacher-forced, its first `tokens` tokens): perplexity and fidelity."""

    source: str
    tokens: int
    perplexity_transformers: float
    perplexity_engine: float
    fidelity: Fidelity


@dataclass
class PromptComparison:
    """One prompt: the largest logit difference (over its positions and every greedy step) and both greedy runs."""

    prompt: str | list[int]
    prompt_ids: list[int]
    max_logit_difference: float  # max |engine - transformers| over (prompt + steps - 1) positions x vocab
    logit_scale: float  # max |transformers logit| over the same positions
    engine_tokens: list[int]  # the engine's own greedy tokens (its generation path, EOS not special)
    transformers_tokens: list[int]  # transformers' greedy tokens
    fidelity: Fidelity | None = None  # over the `steps` rows that predict transformers' greedy tokens

    @property
    def agreeing_prefix(self) -> int:
        """Greedy tokens identical before the first difference (all of them when none differs)."""
        k = self.first_difference
        return len(self.transformers_tokens) if k is None else k

    @property
    def relative_difference(self) -> float:
        """max_logit_difference / logit_scale."""
        return self.max_logit_difference / self.logit_scale if self.logit_scale > 0 else self.max_logit_difference

    @property
    def agreement(self) -> list[bool]:
        """Step by step, whether the two systems picked the same greedy token (after a first difference the contexts
        differ, so later steps compare continuations of different texts)."""
        return [a == b for a, b in zip(self.engine_tokens, self.transformers_tokens)]

    @property
    def first_difference(self) -> int | None:
        """Index of the first greedy step where the tokens differ, None when all agree."""
        return next((i for i, same in enumerate(self.agreement) if not same), None)

    @property
    def greedy_identical(self) -> bool:
        """Whether every greedy token agrees."""
        return self.engine_tokens == self.transformers_tokens


@dataclass
class LlamaCppFigures:
    """llama.cpp on the same GGUF file against the same reference (the file's exact meaning): the same figures as
    the engine's, from the same teacher-forced rows and text."""

    version: str | None
    fidelity: Fidelity  # pooled over the prompts' greedy rows and the text's positions, as ComparisonReport.fidelity
    agreeing_prefix: list[int]  # per prompt: llama.cpp's own greedy tokens agreeing with transformers' before a difference
    text_perplexity: float | None = None
    text_fidelity: Fidelity | None = None


@dataclass
class ComparisonReport:
    """What `compare_with_transformers` found, for every prompt; `ok` when every prompt is within `tolerance` of the
    logit scale and its greedy tokens are identical."""

    model: str
    backend: str
    steps: int
    tolerance: float
    prompts: list[PromptComparison]
    versions: dict = field(default_factory=dict)  # tinyllama-engine, transformers, torch, numpy
    weights_dtype: str = "float32"  # how this engine held the weights (transformers always runs float32)
    kernel: str = ""  # what ran this engine's matmuls (e.g. "native avx512")
    native_kernels: dict = field(default_factory=dict)  # the NumPy backend's compiled kernels: variant or reason
    text: TextComparison | None = None
    min_agreement: float | None = None  # thresholds on `fidelity` (None: not checked)
    max_kl: float | None = None
    reference: str = "transformers fp32"  # what the engine is compared with
    llamacpp: LlamaCppFigures | None = None  # llama.cpp's figures on the same GGUF file (when installed)

    @property
    def exact(self) -> bool:
        """Whether the weights are held exactly (then `ok` is the strict check), not quantized."""
        return self.weights_dtype in EXACT_WEIGHTS

    @property
    def max_relative_difference(self) -> float:
        """The largest relative logit difference over all prompts."""
        return max(p.relative_difference for p in self.prompts)

    @property
    def fidelity(self) -> Fidelity:
        """Agreement and KL pooled over every teacher-forced row: each prompt's greedy steps and the text's positions."""
        parts = [p.fidelity for p in self.prompts if p.fidelity] + ([self.text.fidelity] if self.text else [])
        n = sum(f.positions for f in parts)
        return Fidelity(n, sum(f.top1_agreement * f.positions for f in parts) / n,
                        sum(f.kl_mean * f.positions for f in parts) / n, max(f.kl_max for f in parts))

    @property
    def within_thresholds(self) -> bool:
        """Whether the pooled fidelity meets min_agreement and max_kl (those given)."""
        f = self.fidelity
        return ((self.min_agreement is None or f.top1_agreement >= self.min_agreement)
                and (self.max_kl is None or f.kl_mean <= self.max_kl))

    @property
    def ok(self) -> bool:
        """Exact weights: every prompt within tolerance and greedy-identical; quantized weights: the thresholds given
        are met (none given: True, a report only). Thresholds given for exact weights apply too."""
        strict = all(p.relative_difference < self.tolerance and p.greedy_identical for p in self.prompts)
        return (strict or not self.exact) and self.within_thresholds

    def to_dict(self) -> dict:
        """The report as plain JSON-ready data (`tinyllama check --json`), derived figures included."""
        out = asdict(self)
        for d, p in zip(out["prompts"], self.prompts):
            d.update(relative_difference=p.relative_difference, agreement=p.agreement,
                     first_difference=p.first_difference, greedy_identical=p.greedy_identical,
                     agreeing_prefix=p.agreeing_prefix)
        out.update(ok=self.ok, exact=self.exact, max_relative_difference=self.max_relative_difference,
                   fidelity=asdict(self.fidelity), within_thresholds=self.within_thresholds)
        return out

    def fidelity_lines(self) -> list[str]:
        """The fidelity part of the summary."""
        f = self.fidelity
        lines = [f"fidelity against {self.reference} ({f.positions} teacher-forced positions): top-1 agreement "
                 f"{100 * f.top1_agreement:.1f}%, KL(transformers || engine) mean {f.kl_mean:.3g} max "
                 f"{f.kl_max:.3g} nats/token"]
        if self.text is not None:
            t = self.text
            lines.append(f"text {t.source} ({t.tokens} tokens): perplexity transformers {t.perplexity_transformers:.4g}"
                         f", engine {t.perplexity_engine:.4g}; top-1 agreement {100 * t.fidelity.top1_agreement:.1f}%,"
                         f" KL mean {t.fidelity.kl_mean:.3g} max {t.fidelity.kl_max:.3g}")
        if self.llamacpp is not None:
            c, g = self.llamacpp, self.llamacpp.fidelity
            lines.append(f"llama.cpp {c.version or ''} on the same file: top-1 agreement {100 * g.top1_agreement:.1f}%,"
                         f" KL mean {g.kl_mean:.3g} max {g.kl_max:.3g} nats/token; greedy tokens agreeing before the "
                         f"first difference: {', '.join(map(str, c.agreeing_prefix))} of {self.steps}")
            if c.text_fidelity is not None:
                lines.append(f"llama.cpp text ({self.text.tokens} tokens): perplexity {c.text_perplexity:.4g}; top-1 "
                             f"agreement {100 * c.text_fidelity.top1_agreement:.1f}%, KL mean "
                             f"{c.text_fidelity.kl_mean:.3g} max {c.text_fidelity.kl_max:.3g}")
            if g.kl_mean > 0:
                lines.append(f"engine / llama.cpp mean KL: {f.kl_mean / g.kl_mean:.2g}x; top-1 agreement "
                             f"{100 * f.top1_agreement:.1f}% vs {100 * g.top1_agreement:.1f}%")
        return lines

    def summary(self) -> str:
        """The human-readable report `tinyllama check` prints, ending in OK or MISMATCH."""
        v = self.versions
        lines = [f"model: {self.model}  backend: {self.backend} ({self.kernel})  weights: {self.weights_dtype}",
                 *([f"reference: {self.reference}"] if self.reference != "transformers fp32" else []),
                 *([f"compiled kernels unavailable: {self.native_kernels['reason']}"]
                   if self.native_kernels.get("reason") else []),
                 f"tinyllama-engine {v.get('tinyllama-engine')}, transformers {v.get('transformers')}, "
                 f"torch {v.get('torch')}, numpy {v.get('numpy')}"]
        for i, p in enumerate(self.prompts, 1):
            lines.append(f"prompt {i}: {p.prompt!r} ({len(p.prompt_ids)} tokens)")
            lines.append(f"  max |logit difference| over the prompt and {self.steps} greedy steps: "
                         f"{p.max_logit_difference:.3e} ({p.relative_difference:.2e} of the logit scale "
                         f"{p.logit_scale:.3g})")
            same = sum(p.agreement)
            lines.append(f"  greedy tokens: {same}/{self.steps} identical")
            if not self.exact and p.fidelity is not None:
                lines.append(f"  {p.agreeing_prefix} greedy tokens agree before the first difference; teacher-forced "
                             f"top-1 agreement {100 * p.fidelity.top1_agreement:.1f}%, KL mean "
                             f"{p.fidelity.kl_mean:.3g} max {p.fidelity.kl_max:.3g}")
            if p.first_difference is not None:
                k = p.first_difference
                lines.append(f"  first difference at step {k + 1}: engine {p.engine_tokens[k]}, "
                             f"transformers {p.transformers_tokens[k]}")
            lines.append(f"  engine:       {p.engine_tokens}")
            lines.append(f"  transformers: {p.transformers_tokens}")
        if not self.exact or self.text is not None or self.llamacpp is not None:
            lines += self.fidelity_lines()
        given = [f"top-1 agreement >= {100 * self.min_agreement:g}%" if self.min_agreement is not None else "",
                 f"mean KL <= {self.max_kl:g}" if self.max_kl is not None else ""]
        given = " and ".join(g for g in given if g)
        if not self.exact:
            if not given:
                what = (f"the file's {self.weights_dtype} weights are run as they are, their activations rounded to "
                        "int16 in the kernels (not exact)" if self.llamacpp is not None or "gguf" in self.reference
                        else f"{self.weights_dtype} weights are quantized (not exact)")
                lines.append(f"REPORT: {what}; give --min-agreement / --max-kl to turn this into a check")
            elif self.ok:
                lines.append(f"OK: within the thresholds ({given})")
            else:
                lines.append(f"BELOW THRESHOLD: asked for {given}")
        elif self.ok:
            lines.append(f"OK: matches transformers (within {self.tolerance:g} of the logit scale, greedy identical)")
        elif not self.within_thresholds:
            lines.append(f"BELOW THRESHOLD: asked for {given}")
        else:
            lines.append(f"MISMATCH: largest difference {self.max_relative_difference:.2e} of the logit scale "
                         f"(tolerance {self.tolerance:g}); greedy identical for "
                         f"{sum(p.greedy_identical for p in self.prompts)}/{len(self.prompts)} prompts")
        return "\n".join(lines)


def compare_with_transformers(ref, prompts=DEFAULT_PROMPT, steps: int = 16, backend: str = "numpy",
                              revision: str | None = None, tolerance: float = TOLERANCE, weights_dtype: str = "auto",
                              text: str | None = None, text_source: str = "text", min_agreement: float | None = None,
                              max_kl: float | None = None, llamacpp: bool = True) -> ComparisonReport:
    """Run this engine and transformers' float32 LlamaForCausalLM on the same checkpoint -> ComparisonReport.

    ref: a model folder or Hub repo id (loaded on `backend` with `weights_dtype`: auto, float32, int8, int4, ...), or
    an already loaded engine `Model` (transformers loads its folder). prompts: one prompt or a list; each text (encoded
    with the model's tokenizer) or a list of token ids. steps: greedy tokens to compare per prompt (>= 1).
    text: a text scored by both systems (perplexity, agreement and KL at every position; its first window of tokens).
    min_agreement (0..1) / max_kl (nats per token, on the mean): thresholds on the pooled fidelity (report.ok).
    A GGUF model is compared with its file's exact meaning: every tensor dequantized by gguf-py
    (`gguf.quants.dequantize`) into transformers' float32 LlamaForCausalLM; with llamacpp (and llama-cpp-python
    installed) llama.cpp's figures on the same file are reported beside the engine's (report.llamacpp).
    EngineError when torch / transformers are missing, a threshold is out of range, or a prompt plus `steps` does not
    fit the context window.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EngineError(f"steps must be an integer >= 1, got {steps!r}")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise EngineError(f"min_agreement must be in [0, 1] (a fraction), got {min_agreement!r}")
    if max_kl is not None and not max_kl >= 0:
        raise EngineError(f"max_kl must be >= 0 (nats per token), got {max_kl!r}")
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise EngineError("comparing with transformers needs transformers and torch: pip install transformers torch")
    model = ref if isinstance(ref, Model) else load_model(str(ref), backend=backend, revision=revision,
                                                          weights_dtype=weights_dtype)
    if model.folder is None and model.gguf_path is None:
        raise EngineError("the model has no folder for transformers to load")
    if isinstance(prompts, str) or (prompts and all(isinstance(t, (int, np.integer)) for t in prompts)):
        prompts = [prompts]
    if not prompts:
        raise EngineError("give at least one prompt")
    if model.gguf_path is not None:
        reference, reference_name = gguf_reference(model.gguf_path), "the file's exact meaning (gguf dequantized, " \
            "transformers fp32)"
    else:
        reference, reference_name = _load_reference(model.folder), "transformers fp32"
    results, paths = [], []
    for prompt in prompts:
        ids = model.prompt_ids(prompt)
        if not ids:
            raise EngineError(f"prompt {prompt!r} has no tokens")
        window = model.config.max_position_embeddings
        if len(ids) + steps > window:
            raise EngineError(f"a prompt of {len(ids)} tokens and {steps} steps exceed the context window of {window}")
        ref_logits, ref_tokens = _transformers_run(reference, ids, steps)
        ours = _engine_logits_along(model, ids, ref_tokens[:-1])
        engine_tokens = model.generate(ids, max_new_tokens=steps, ignore_eos=True, repetition_penalty=1.0)
        path = slice(len(ids) - 1, None)  # the rows that predict the greedy tokens
        results.append(PromptComparison(
            prompt=prompt if isinstance(prompt, str) else [int(t) for t in prompt], prompt_ids=ids,
            max_logit_difference=float(np.max(np.abs(ours - ref_logits))),
            logit_scale=float(np.max(np.abs(ref_logits))), engine_tokens=engine_tokens,
            transformers_tokens=ref_tokens, fidelity=Fidelity.of(ref_logits[path], ours[path])))
        paths.append((ids, ref_tokens, ref_logits[path]))
    scored, text_ref = _compare_text(model, reference, text, text_source) if text is not None else (None, None)
    from engine import llamacpp as llamacpp_runner

    llamacpp_figures = None
    if llamacpp and model.gguf_path is not None and llamacpp_runner.available():
        llamacpp_figures = _llamacpp_figures(model, paths, steps, text_ref)
    from engine.runtime import layers

    numpy = model.backend.name == "numpy"
    kernel = layers.matmul_kernel_name(model.weights_dtype) if numpy else model.backend.name
    return ComparisonReport(model=model.source, backend=model.backend.name, steps=steps, tolerance=tolerance,
                            prompts=results, versions=versions(), weights_dtype=model.weights_dtype, kernel=kernel,
                            native_kernels=native.summary() if numpy else {},
                            text=scored, min_agreement=min_agreement, max_kl=max_kl, reference=reference_name,
                            llamacpp=llamacpp_figures)


def _llamacpp_figures(model: Model, paths: list, steps: int, text_ref) -> LlamaCppFigures:
    """llama.cpp on model.gguf_path over the same rows: each prompt's ids + transformers' greedy tokens (the rows that
    predict them, against the reference's logits there) and its own greedy run; the text's every position."""
    from engine import llamacpp as runner

    window = max([len(ids) + steps for ids, _, _ in paths] + [len(text_ref[0]) if text_ref else 0]) + 8
    parts, prefixes = [], []
    with runner.LlamaCpp(model.gguf_path, n_ctx=window) as lc:
        for ids, ref_tokens, ref_rows in paths:
            logits = lc.logits(ids + ref_tokens[:-1])[len(ids) - 1 :]
            parts.append(Fidelity.of(ref_rows, logits))
            own = lc.greedy(ids, steps)
            prefixes.append(next((i for i, (a, b) in enumerate(zip(own, ref_tokens)) if a != b), len(ref_tokens)))
        text_fidelity = text_ppl = None
        if text_ref is not None:
            ids, ref = text_ref
            logits = lc.logits(ids)
            text_fidelity, text_ppl = Fidelity.of(ref[:-1], logits[:-1]), perplexity(logits, ids)
            parts.append(text_fidelity)
    n = sum(f.positions for f in parts)
    pooled = Fidelity(n, sum(f.top1_agreement * f.positions for f in parts) / n,
                      sum(f.kl_mean * f.positions for f in parts) / n, max(f.kl_max for f in parts))
    return LlamaCppFigures(runner.version(), pooled, prefixes, text_ppl, text_fidelity)


def gguf_reference(path):
    """A GGUF file's exact meaning: transformers' float32 LlamaForCausalLM (eager attention, eval mode) holding every
    tensor of the file dequantized by llama.cpp's gguf-py (`gguf.quants.dequantize`), q_proj / k_proj rows put back
    in Hugging Face's order (weights.gguf_file.GGUFFile.hf_row_order)."""
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers import LlamaConfig, LlamaForCausalLM

    from weights.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        raw = f.config_dict()
        config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
        state = {}
        for name, t in f.tensors.items():
            rows = f.rows(name, f.hf_row_order(name, raw))
            values = dequantize(np.ascontiguousarray(rows), GGMLQuantizationType[t.type_name])
            state[name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(t.shape))
            f.release(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its tables, on the CPU
    model.config._attn_implementation = "eager"
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise EngineError(f"{path}: the reference lacks {missing[0]}")
    return model.eval()


def _compare_text(model: Model, reference, text: str, source: str) -> tuple[TextComparison, tuple]:
    """Both systems' logits over `text` (BOS + its tokens, cut to the window) -> (perplexities and fidelity, (the ids,
    the reference's logits))."""
    import torch

    ids = model.prompt_ids(text)[: model.config.max_position_embeddings]
    if len(ids) < 2:
        raise EngineError(f"{source}: the text needs at least one token to score")
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].float().numpy()
    ours = model.logits(ids)
    return TextComparison(source=source, tokens=len(ids), perplexity_transformers=perplexity(ref, ids),
                          perplexity_engine=perplexity(ours, ids), fidelity=Fidelity.of(ref[:-1], ours[:-1])), (ids, ref)


def versions() -> dict:
    """Versions of both systems and of what they run on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("tinyllama-engine", "transformers", "torch", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _load_reference(folder: Path):
    """transformers' float32 LlamaForCausalLM on `folder`, eager attention, in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def transformers_step(model, input_ids, cache=None, **kwargs):
    """One forward of a transformers causal LM continuing `cache` (None: a new sequence) -> its output and its cache.

    input_ids: (batch, T) torch int64. transformers 5.2x renamed `past_key_values` to `cache` (the argument and the
    output field; the old name is deprecated); the name the model's forward takes is used, so 4.x and 5.x both work.
    """
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if cache is not None:
        kwargs[name] = cache
    out = model(input_ids, use_cache=True, **kwargs)
    return out, getattr(out, name)


def _transformers_run(reference, ids: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """transformers' greedy tokens after `ids` (with its KV cache), and its logits at every position of
    ids + tokens[:-1] from one full forward: ((len(ids) + steps - 1, vocab) float32, `steps` tokens)."""
    import torch

    tokens: list[int] = []
    with torch.no_grad():
        out, cache = transformers_step(reference, torch.tensor([ids]))
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            if len(tokens) < steps:
                out, cache = transformers_step(reference, torch.tensor([[tokens[-1]]]), cache)
        logits = reference(torch.tensor([ids + tokens[:-1]])).logits[0].float().numpy()
    return logits, tokens


def _engine_logits_along(model: Model, ids: list[int], fed: list[int]) -> np.ndarray:
    """The engine's logits at every prompt position (one prefill) and then after each token of `fed`, one decode
    step at a time through the KV cache: (len(ids) + len(fed), vocab) float32."""
    cache = model.new_cache()
    rows = [model.forward([SequenceStep(cache, ids, all_logits=True)])[0]]
    for token in fed:
        rows.append(model.forward([SequenceStep(cache, [token])])[0])
    return np.concatenate(rows)
