"""`tinyllama check`: this engine against transformers on the same weights (engine.compare), printed as text or JSON.
The tool a user with real weights runs to trust the engine; exit status 1 on a mismatch (exact weights) or when the
fidelity misses the thresholds given (--min-agreement, --max-kl; quantized weights are only reported without them)."""
from __future__ import annotations

import json
from pathlib import Path

from engine.cli.common import load
from engine.compare import DEFAULT_PROMPT, compare_with_transformers
from engine.errors import EngineError


def run_check(args) -> int:
    """The `check` subcommand: compare with transformers, print the report -> exit status (0: match, 1: mismatch)."""
    if args.steps < 1:
        raise EngineError(f"--steps must be >= 1, got {args.steps}")
    text = None
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EngineError(f"--text {args.text}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise EngineError(f"--min-agreement must be a fraction in [0, 1], got {args.min_agreement}")
    if args.max_kl is not None and not args.max_kl >= 0:
        raise EngineError(f"--max-kl must be >= 0, got {args.max_kl}")
    model = load(args)
    prompts = args.prompt or [DEFAULT_PROMPT]
    if not model.has_tokenizer:  # ids only: start from BOS
        if text is not None:
            raise EngineError("--text needs the model's tokenizer (tokenizer.json), which this model folder lacks")
        prompts = [[model.config.bos_token_id or 0]]
    report = compare_with_transformers(model, prompts, steps=args.steps, text=text, text_source=args.text,
                                       min_agreement=args.min_agreement, max_kl=args.max_kl,
                                       llamacpp=not args.no_llama_cpp)
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0 if report.ok else 1
