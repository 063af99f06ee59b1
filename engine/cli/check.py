"""`tinyllama check`: this engine against transformers on the same weights (engine.compare), printed as text or JSON.
The tool a user with real weights runs to trust the engine; exit status 1 on a mismatch."""
from __future__ import annotations

import json

from engine.cli.common import load
from engine.compare import DEFAULT_PROMPT, compare_with_transformers
from engine.errors import EngineError


def run_check(args) -> int:
    """The `check` subcommand: compare with transformers, print the report -> exit status (0: match, 1: mismatch)."""
    if args.steps < 1:
        raise EngineError(f"--steps must be >= 1, got {args.steps}")
    model = load(args)
    prompts = args.prompt or [DEFAULT_PROMPT]
    if not (model.folder / "tokenizer.json").exists():  # ids only: start from BOS
        prompts = [[model.config.bos_token_id or 0]]
    report = compare_with_transformers(model, prompts, steps=args.steps)
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0 if report.ok else 1
