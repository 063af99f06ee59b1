"""`tinyllama generate`: complete one prompt, streaming the text (or one JSON object with --json)."""
from __future__ import annotations

import json
import sys

from engine.cli.common import NO_TEMPLATE_HINT, chat_template_of, load, sampling_overrides, speculation_options
from engine.errors import EngineError
from engine.generation.constraints import STOP_CONSTRAINT_ERROR, ConstraintError
from engine.generation.draft_payoff import describe
from engine.generation.generate import Generation
from engine.generation.state import STOP_CONTEXT_FULL, STOP_MAX_TOKENS, STOP_STRING, default_options

CUT_OFF_BY = {STOP_MAX_TOKENS: "--max-new-tokens ({n})", STOP_CONTEXT_FULL: "the end of the model's context window",
              STOP_STRING: "a --stop string", STOP_CONSTRAINT_ERROR: "a limit of the constraint's matcher"}


def prompt_ids_for(model, args) -> list[int]:
    """The prompt text (argument or stdin), tokenized, wrapped in the chat template with --chat."""
    text = args.prompt if args.prompt not in (None, "-") else sys.stdin.read()
    tokenizer = model.tokenizer
    if not args.chat:
        if args.system:
            raise EngineError("--system needs --chat")
        return tokenizer.encode(text)
    if tokenizer.chat_template is None:
        raise EngineError(f"{args.model} has no chat template: {NO_TEMPLATE_HINT}, or run without --chat for plain "
                          "completion")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}]
    return tokenizer.encode_chat(messages)


def constraint_overrides(args) -> dict:
    """--json-schema / --json-object / --regex / --choice / --grammar as Model.complete's keyword arguments (files
    read here; EngineError naming the flag when one cannot be read)."""
    out = {"regex": args.regex, "choice": args.choice, "json_object": args.json_object,
           "json_whitespace": args.json_whitespace}
    for flag, key in (("--json-schema", "json_schema"), ("--grammar", "grammar")):
        path = getattr(args, key)
        if path is not None:
            try:
                with open(path, encoding="utf-8") as handle:
                    out[key] = handle.read()
            except (OSError, UnicodeDecodeError) as e:
                raise EngineError(f"{flag}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    return out


def constraint_flag(args) -> str | None:
    """The structured-output flag given (--json-schema, --json-object, --regex, --choice, --grammar), or None."""
    for flag in ("json_schema", "json_object", "regex", "choice", "grammar"):
        if getattr(args, flag):
            return "--" + flag.replace("_", "-")
    return None


def cut_off_warning(args, stop_reason: str) -> str | None:
    """The one stderr line for a constrained output that stopped before its constraint was complete, else None."""
    flag = constraint_flag(args)
    if flag is None or stop_reason not in CUT_OFF_BY:
        return None  # no constraint, or it completed (EOS is only allowed once it accepts)
    cause = CUT_OFF_BY[stop_reason].format(n=args.max_new_tokens)
    return (f"tinyllama: warning: the output was cut off by {cause} before it completed {flag}: it does not match "
            f"it" + ("; raise --max-new-tokens or bound the output (maxLength, maxItems, ...)"
                     if stop_reason == STOP_MAX_TOKENS else ""))


def run_generate(args) -> int:
    """The `generate` subcommand: stream the completion (or print JSON with --json) -> exit status 0."""
    speculation = speculation_options(args)
    constraint = constraint_overrides(args)  # unreadable files fail before the model loads
    if args.chat_template and not args.chat:
        raise EngineError("--chat-template needs --chat")
    chat_template_of(args)
    model = load(args)
    stop = list(args.stop) + (list(model.tokenizer.chat_stop) if args.chat else [])
    try:
        options = default_options(model, max_new_tokens=args.max_new_tokens, stop=stop,
                                  ignore_eos=args.ignore_eos, **sampling_overrides(args), **constraint)
    except ConstraintError as e:  # name the flag, not the keyword argument
        flag = "--" + e.field.replace("_", "-")
        raise EngineError(flag + str(e)[len(e.field):] if str(e).startswith(e.field) else f"{flag}: {e}") from None
    ids = prompt_ids_for(model, args)
    gen = Generation(model, ids, options, truncate=args.truncate, **speculation)
    for event in gen:
        if not args.json and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    r = gen.result
    warning = cut_off_warning(args, r.stop_reason)
    if args.json:
        out = result_json(r)
        if constraint_flag(args) is not None:
            out["constraint_complete"] = warning is None
        out["warnings"] = [warning] if warning else []
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if warning:
        print(warning, file=sys.stderr)
    if args.verbose:
        from engine.runtime.layers import matmul_kernel_name

        kernel = matmul_kernel_name(model.weights_dtype) if args.backend == "numpy" else args.backend
        print(f"prompt tokens: {len(r.prompt_token_ids)}  prefill: {r.prompt_tokens_per_s:.1f} tok/s  "
              f"time to first token: {r.time_to_first_token:.3f} s  generated: {len(r.token_ids)} tokens at "
              f"{r.generated_tokens_per_s:.2f} tok/s  stop: {r.stop_reason}  backend: {args.backend} ({kernel})  "
              f"weights: {model.weights_dtype}"
              + (f"  speculative ({args.draft} draft): "
                 + describe(r.draft_tokens, r.accepted_draft_tokens, r.draft_steps, r.plain_steps)
                 if args.speculate else ""),
              file=sys.stderr)
    return 0


def result_json(r) -> dict:
    """A GenerationResult as the dict `generate --json` prints: text, token ids, timings, speculative stats."""
    return {
        "text": r.text,
        "token_ids": r.token_ids,
        "prompt_token_ids": r.prompt_token_ids,
        "stop_reason": r.stop_reason,
        "timings": {
            "prompt_tokens_per_s": r.prompt_tokens_per_s,
            "generated_tokens_per_s": r.generated_tokens_per_s,
            "time_to_first_token_s": r.time_to_first_token,
            "prefill_s": r.prefill_seconds,
            "decode_s": r.decode_seconds,
        },
        "speculative": {"draft_tokens": r.draft_tokens, "accepted_draft_tokens": r.accepted_draft_tokens,
                        "acceptance_rate": r.acceptance_rate, "draft_steps": r.draft_steps,
                        "plain_steps": r.plain_steps},
    }
