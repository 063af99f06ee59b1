"""`tinyllama` command line: the parser and the dispatch to one module per subcommand. User errors print one line
and exit non-zero."""
from __future__ import annotations

import argparse
import sys

from engine.cli.common import (USER_ERRORS, add_chat_template_option, add_model_options, add_sampling_options,
                               add_speculation_options, fail)


def build_parser() -> argparse.ArgumentParser:
    """The `tinyllama` argument parser with its check, generate, chat, inspect, serve and bench subcommands."""
    parser = argparse.ArgumentParser(prog="tinyllama", description="TinyLlama inference engine (NumPy / Triton).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="compare this engine's logits and greedy tokens with transformers")
    add_model_options(p)
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt text; may be repeated (default: 'The capital of France is')")
    p.add_argument("--steps", type=int, default=16, help="greedy steps to compare per prompt (default 16)")
    p.add_argument("--text", metavar="FILE", help="also score this text with both systems: perplexity, top-1 "
                                                  "agreement and KL at every position (its first window of tokens)")
    p.add_argument("--min-agreement", type=float, metavar="F",
                   help="fail (exit 1) when the teacher-forced top-1 agreement is below F (a fraction, e.g. 0.95)")
    p.add_argument("--max-kl", type=float, metavar="NATS",
                   help="fail (exit 1) when the mean KL(transformers || engine) per token is above NATS")
    p.add_argument("--no-llama-cpp", action="store_true",
                   help="with a GGUF file: leave out llama.cpp's figures on the same file (reported beside ours when "
                        "llama-cpp-python is installed)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")

    p = sub.add_parser("generate", help="complete a prompt, streaming the text")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_chat_template_option(p)
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--truncate", action="store_true", help="drop the prompt's oldest tokens so that it and --max-new-tokens fit the window")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    add_speculation_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--verbose", "-v", action="store_true", help="statistics on stderr")
    g = p.add_argument_group("structured output (one of these; the text is guaranteed to match it unless cut off "
                                 "by --max-new-tokens, a --stop string or a full window: then a warning on stderr "
                                 "says so, and --json's constraint_complete is false)")
    g.add_argument("--json-schema", metavar="FILE", help="a JSON Schema file: the output is JSON valid against it")
    g.add_argument("--json-object", action="store_true", help="the output is a JSON object (any)")
    g.add_argument("--json-whitespace", choices=("compact", "flexible"), default="compact",
                   help="JSON without whitespace between tokens (default) or with any amount of it")
    g.add_argument("--regex", metavar="R", help="the output matches this regular expression (Rust regex syntax)")
    g.add_argument("--choice", action="append", metavar="TEXT", help="the output is one of these; repeat the flag")
    g.add_argument("--grammar", metavar="FILE", help="a Lark (llguidance) or GBNF (llama.cpp) grammar file")

    p = sub.add_parser("chat", help="interactive chat REPL")
    add_model_options(p)
    add_sampling_options(p)
    add_speculation_options(p)
    add_chat_template_option(p)
    p.add_argument("--system", help="system prompt")

    from engine.cli.inspect import add_inspect_parser

    add_inspect_parser(sub)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, completions, models, "
                                     "health, metrics)")
    from engine.cli.serve import add_serve_arguments

    add_serve_arguments(p)

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
            from engine.cli.check import run_check

            return run_check(args)
        if args.command == "generate":
            from engine.cli.generate import run_generate

            return run_generate(args)
        if args.command == "chat":
            from engine.cli.chat import run_chat

            return run_chat(args)
        if args.command == "inspect":
            from engine.cli.inspect import run_inspect

            return run_inspect(args)
        if args.command == "serve":
            from engine.cli.serve import run_serve

            return run_serve(args)
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


if __name__ == "__main__":
    sys.exit(main())
