"""This engine against transformers on the same weights, as a report a user can print or assert on in a test.

`compare_with_transformers(ref, prompts, steps)` runs both systems on each prompt: the logits at every prompt position
and at every greedy step (the engine's decode path, one token per forward through its KV cache, fed transformers'
greedy tokens so both see the same context), and each system's own greedy tokens. `tinyllama check` prints the
report; a test can assert `report.ok` or look at the figures. torch and transformers are imported only when called.
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


@dataclass
class PromptComparison:
    """One prompt: the largest logit difference (over its positions and every greedy step) and both greedy runs."""

    prompt: str | list[int]
    prompt_ids: list[int]
    max_logit_difference: float  # max |engine - transformers| over (prompt + steps - 1) positions x vocab
    logit_scale: float  # max |transformers logit| over the same positions
    engine_tokens: list[int]  # the engine's own greedy tokens (its generation path, EOS not special)
    transformers_tokens: list[int]  # transformers' greedy tokens

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

    @property
    def max_relative_difference(self) -> float:
        """The largest relative logit difference over all prompts."""
        return max(p.relative_difference for p in self.prompts)

    @property
    def ok(self) -> bool:
        """Every prompt within tolerance and greedy-identical."""
        return all(p.relative_difference < self.tolerance and p.greedy_identical for p in self.prompts)

    def to_dict(self) -> dict:
        """The report as plain JSON-ready data (`tinyllama check --json`), derived figures included."""
        out = asdict(self)
        for d, p in zip(out["prompts"], self.prompts):
            d.update(relative_difference=p.relative_difference, agreement=p.agreement,
                     first_difference=p.first_difference, greedy_identical=p.greedy_identical)
        out.update(ok=self.ok, max_relative_difference=self.max_relative_difference)
        return out

    def summary(self) -> str:
        """The human-readable report `tinyllama check` prints, ending in OK or MISMATCH."""
        v = self.versions
        lines = [f"model: {self.model}  backend: {self.backend} ({self.kernel})  weights: {self.weights_dtype}",
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
            if p.first_difference is not None:
                k = p.first_difference
                lines.append(f"  first difference at step {k + 1}: engine {p.engine_tokens[k]}, "
                             f"transformers {p.transformers_tokens[k]}")
            lines.append(f"  engine:       {p.engine_tokens}")
            lines.append(f"  transformers: {p.transformers_tokens}")
        if self.ok:
            lines.append(f"OK: matches transformers (within {self.tolerance:g} of the logit scale, greedy identical)")
        else:
            lines.append(f"MISMATCH: largest difference {self.max_relative_difference:.2e} of the logit scale "
                         f"(tolerance {self.tolerance:g}); greedy identical for "
                         f"{sum(p.greedy_identical for p in self.prompts)}/{len(self.prompts)} prompts")
        return "\n".join(lines)


def compare_with_transformers(ref, prompts=DEFAULT_PROMPT, steps: int = 16, backend: str = "numpy",
                              revision: str | None = None, tolerance: float = TOLERANCE) -> ComparisonReport:
    """Run this engine and transformers' float32 LlamaForCausalLM on the same checkpoint -> ComparisonReport.

    ref: a model folder or Hub repo id (loaded on `backend`), or an already loaded engine `Model` (transformers loads
    its folder). prompts: one prompt or a list; each text (encoded with the model's tokenizer) or a list of token ids.
    steps: greedy tokens to compare per prompt (>= 1). EngineError when torch / transformers are missing or a prompt
    plus `steps` does not fit the context window.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EngineError(f"steps must be an integer >= 1, got {steps!r}")
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise EngineError("comparing with transformers needs transformers and torch: pip install transformers torch")
    model = ref if isinstance(ref, Model) else load_model(str(ref), backend=backend, revision=revision)
    if model.folder is None:
        raise EngineError("the model has no folder for transformers to load")
    if isinstance(prompts, str) or (prompts and all(isinstance(t, (int, np.integer)) for t in prompts)):
        prompts = [prompts]
    if not prompts:
        raise EngineError("give at least one prompt")
    reference = _load_reference(model.folder)
    results = []
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
        results.append(PromptComparison(
            prompt=prompt if isinstance(prompt, str) else [int(t) for t in prompt], prompt_ids=ids,
            max_logit_difference=float(np.max(np.abs(ours - ref_logits))),
            logit_scale=float(np.max(np.abs(ref_logits))), engine_tokens=engine_tokens,
            transformers_tokens=ref_tokens))
    from engine.runtime import layers

    numpy = model.backend.name == "numpy"
    kernel = layers.matmul_kernel_name(model.weights_dtype) if numpy else model.backend.name
    return ComparisonReport(model=str(model.folder), backend=model.backend.name, steps=steps, tolerance=tolerance,
                            prompts=results, versions=versions(), weights_dtype=model.weights_dtype, kernel=kernel,
                            native_kernels=native.summary() if numpy else {})


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
