"""`tinyllama` command line: check, generate, chat, bench. User errors print one line and exit non-zero."""
from __future__ import annotations

import argparse
import json
import sys

from engine.blas import choose_openblas_kernel

choose_openblas_kernel()  # before NumPy is imported below  # noqa: E402

from engine.errors import EngineError  # noqa: E402
from weights.errors import CheckpointError  # noqa: E402
from weights.hub import DEFAULT_MODEL  # noqa: E402

USER_ERRORS = (CheckpointError, EngineError)


def fail(message: str, code: int = 1) -> int:
    """Print one line on stderr; the exit status to return."""
    print(f"tinyllama: error: {message}", file=sys.stderr)
    return code


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Add --model, --revision and --backend to `p`."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local folder or Hugging Face repo id (default {DEFAULT_MODEL})")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--backend", choices=("numpy", "triton"), default="numpy", help="forward implementation")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Add the sampling options (--temperature .. --seed), --max-new-tokens and --stop to `p`."""
    g = p.add_argument_group("sampling (defaults from the model's generation_config.json; greedy otherwise)")
    g.add_argument("--temperature", type=float, help="0 means greedy")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (transformers semantics)")
    g.add_argument("--seed", type=int, help="make sampling reproducible")
    g.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens (default 256)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not printed); may be repeated")


def sampling_overrides(args) -> dict:
    """The sampling options of parsed `args` as keyword arguments (None: not given, the model's default)."""
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def build_parser() -> argparse.ArgumentParser:
    """The `tinyllama` argument parser with its check, generate, chat and bench subcommands."""
    parser = argparse.ArgumentParser(prog="tinyllama", description="TinyLlama inference engine (NumPy / Triton).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="compare this engine's logits and greedy tokens with transformers")
    add_model_options(p)
    p.add_argument("--prompt", default="The capital of France is", help="prompt text (default: %(default)r)")
    p.add_argument("--steps", type=int, default=16, help="greedy steps to compare (default 16)")

    p = sub.add_parser("generate", help="complete a prompt, streaming the text")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--truncate", action="store_true", help="drop the prompt's oldest tokens if it exceeds the window")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    p.add_argument("--speculate", type=int, default=0, metavar="N",
                   help="prompt-lookup speculative decoding: draft up to N tokens from the context per step")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--verbose", "-v", action="store_true", help="statistics on stderr")

    p = sub.add_parser("chat", help="interactive chat REPL")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--system", help="system prompt")

    p = sub.add_parser("bench", help="throughput benchmark against transformers (and llama.cpp)")
    try:
        from bench.cli import add_bench_arguments
    except ImportError:  # bench/ not built yet
        add_bench_arguments = None
    if add_bench_arguments:
        add_bench_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `tinyllama` command line (`argv`, default sys.argv[1:]) -> exit status (1: user error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            from engine.check import run_check

            return run_check(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "chat":
            from engine.repl import run_chat

            return run_chat(args)
        if args.command == "bench":
            from bench.cli import run_bench

            return run_bench(args)
    except USER_ERRORS as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 2


def load(args):
    """Load the model named by --model/--revision/--backend."""
    from engine.model import load_model

    return load_model(args.model, backend=args.backend, revision=args.revision)


def prompt_ids_for(model, args) -> list[int]:
    """The prompt text (argument or stdin), tokenized, wrapped in the chat template with --chat."""
    text = args.prompt if args.prompt not in (None, "-") else sys.stdin.read()
    tokenizer = model.tokenizer
    if not args.chat:
        if args.system:
            raise EngineError("--system needs --chat")
        return tokenizer.encode(text)
    if tokenizer.chat_template is None:
        raise EngineError(f"{args.model} has no chat template; run without --chat for plain completion")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}]
    return tokenizer.encode_chat(messages)


def run_generate(args) -> int:
    """The `generate` subcommand: stream the completion (or print JSON with --json) -> exit status 0."""
    from engine.generate import Generation, default_options

    model = load(args)
    options = default_options(model, max_new_tokens=args.max_new_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
                              **sampling_overrides(args))
    ids = prompt_ids_for(model, args)
    if args.truncate:
        ids = ids[-max(1, model.config.max_position_embeddings - options.max_new_tokens):]
    gen = Generation(model, ids, options, speculate=args.speculate)
    for event in gen:
        if not args.json and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    r = gen.result
    if args.json:
        print(json.dumps(result_json(r), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        from engine.native import kernel_name

        kernel = kernel_name() if args.backend == "numpy" else args.backend
        print(f"prompt tokens: {len(r.prompt_token_ids)}  prefill: {r.prompt_tokens_per_s:.1f} tok/s  "
              f"time to first token: {r.time_to_first_token:.3f} s  generated: {len(r.token_ids)} tokens at "
              f"{r.generated_tokens_per_s:.2f} tok/s  stop: {r.stop_reason}  backend: {args.backend} ({kernel})"
              + (f"  speculative: {r.accepted_draft_tokens}/{r.draft_tokens} drafts accepted "
                 f"({100 * r.acceptance_rate:.0f}%)" if args.speculate else ""),
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
                        "acceptance_rate": r.acceptance_rate},
    }


if __name__ == "__main__":
    sys.exit(main())
