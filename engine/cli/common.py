"""What every `tinyllama` subcommand shares: the model and sampling options, loading, and one-line user errors."""
from __future__ import annotations

import argparse
import sys

from engine.errors import EngineError
from engine.model import load_model
from engine.runtime.weights import WEIGHTS_DTYPE_CHOICES
from engine.text.chat_templates import NAMED, resolve_chat_template
from weights.errors import CheckpointError
from weights.hub import DEFAULT_MODEL

USER_ERRORS = (CheckpointError, EngineError)


def fail(message: str, code: int = 1) -> int:
    """Print one line on stderr; the exit status to return."""
    print(f"tinyllama: error: {message}", file=sys.stderr)
    return code


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Add --model, --revision, --backend and --weights-dtype to `p`."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local folder, Hugging Face repo id (default {DEFAULT_MODEL}) or a GGUF file "
                        "(path/to/model.gguf: llama.cpp's format, run in its own types)")
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="the GGUF file NAME in the --model repo or folder (e.g. tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf; "
                        "downloaded into the Hugging Face cache)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--backend", choices=("numpy", "triton"), default="numpy", help="forward implementation")
    p.add_argument("--weights-dtype", choices=WEIGHTS_DTYPE_CHOICES, default="auto",
                   help="how to hold the weights: auto (default) keeps a bf16/fp16 checkpoint 16-bit, widened exactly "
                        "inside the kernels (half the memory and bytes per token); float32 widens them at load; "
                        "int8 / int4 quantize them at load (groups of 32, float16 scales), q4_k_m as llama.cpp's "
                        "Q4_K_M mix: inexact modes, see docs/weights.md)")


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


def add_speculation_options(p: argparse.ArgumentParser) -> None:
    """Add --speculate N and --draft lookup|int8|int4 to `p`."""
    from engine.generation.speculative import DRAFT_CHOICES

    p.add_argument("--speculate", type=int, default=0, metavar="N",
                   help="speculative decoding: draft up to N tokens per step and verify them in one forward; the "
                        "output is exactly plain decoding's (default 0: off)")
    p.add_argument("--draft", choices=DRAFT_CHOICES, default="lookup",
                   help="where drafts come from: lookup (earlier occurrences in the context; default), int8 or int4 "
                        "(the model's own quantized copy, loaded beside it)")


def speculation_options(args) -> dict:
    """--speculate and --draft as keyword arguments; EngineError for a negative N or a draft without --speculate."""
    if args.speculate < 0:
        raise EngineError(f"speculate must be an integer >= 0, got {args.speculate}")
    if args.draft != "lookup" and not args.speculate:
        raise EngineError(f"--draft {args.draft} needs --speculate N (N >= 1 draft tokens per step)")
    return {"speculate": args.speculate, "draft": args.draft}


def sampling_overrides(args) -> dict:
    """The sampling options of parsed `args` as keyword arguments (None: not given, the model's default)."""
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def add_chat_template_option(p: argparse.ArgumentParser) -> None:
    """Add --chat-template FILE|NAME to `p`."""
    p.add_argument("--chat-template", metavar="FILE|NAME",
                   help=f"chat with this template instead of the model's own, or where it has none: a name "
                        f"({', '.join(NAMED)}) or a Jinja file (transformers' chat-template dialect)")


def chat_template_of(args):
    """--chat-template resolved (a ChatTemplate), or None when not given; EngineError naming the flag."""
    value = getattr(args, "chat_template", None)
    return None if value is None else resolve_chat_template(value, "--chat-template")


NO_TEMPLATE_HINT = (f"give one with --chat-template ({', '.join(NAMED)}, or a Jinja file)")


def load(args):
    """Load the model named by --model/--gguf-file/--revision/--backend/--weights-dtype (with --chat-template where
    given)."""
    return load_model(args.model, backend=args.backend, revision=args.revision, weights_dtype=args.weights_dtype,
                      gguf_file=getattr(args, "gguf_file", None), chat_template=chat_template_of(args))
