"""`tinyllama check`: this engine against transformers on the same weights — largest logit difference and greedy
token agreement. The tool a user with real weights runs to trust the engine."""
from __future__ import annotations

import importlib.util

import numpy as np

from engine.cli.common import load
from engine.errors import EngineError

TOLERANCE = 1e-3  # relative to the logit scale; the test suite holds the NumPy backend to 1e-4


def transformers_logits_and_greedy(folder, ids: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """transformers' float32 LlamaForCausalLM on `folder`: (prompt logits (T, vocab), `steps` greedy tokens)."""
    import torch
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    tokens: list[int] = []
    with torch.no_grad():
        out = ref(torch.tensor([ids]), use_cache=True)
        logits = out.logits[0].float().numpy()
        past, nxt = out.past_key_values, int(np.argmax(logits[-1]))
        for _ in range(steps):
            tokens.append(nxt)
            out = ref(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    return logits, tokens


def run_check(args) -> int:
    """The `check` subcommand: compare with transformers, print the report -> exit status (0: match)."""
    if args.steps < 1:
        raise EngineError(f"--steps must be >= 1, got {args.steps}")
    model = load(args)
    try:
        ids = model.tokenizer.encode(args.prompt)
    except Exception:  # noqa: BLE001 - a folder without a tokenizer: start from BOS
        ids = [model.config.bos_token_id or 0]
    ours = model.logits(ids)
    ours_tokens = model.generate(ids, max_new_tokens=args.steps, ignore_eos=True)
    print(f"model: {model.folder}  backend: {args.backend}  weights: {model.weights_dtype}  prompt: {len(ids)} tokens")
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        print(f"this engine's greedy tokens: {ours_tokens}")
        raise EngineError("transformers and torch are not installed: pip install transformers torch")
    ref_logits, ref_tokens = transformers_logits_and_greedy(model.folder, ids, args.steps)
    diff = float(np.max(np.abs(ours - ref_logits)))
    relative = diff / float(np.max(np.abs(ref_logits)))
    same = next((i for i, (a, b) in enumerate(zip(ours_tokens, ref_tokens)) if a != b), args.steps)
    print(f"max |logit difference| over the prompt: {diff:.3e} ({relative:.2e} of the logit scale)")
    print(f"greedy tokens: {same}/{args.steps} identical")
    if same < args.steps:
        print(f"first difference at step {same + 1}: engine {ours_tokens[same]}, transformers {ref_tokens[same]}")
    print(f"engine:       {ours_tokens}\ntransformers: {ref_tokens}")
    ok = same == args.steps and relative < TOLERANCE
    print("OK: matches transformers" if ok else "MISMATCH")
    return 0 if ok else 1

