"""`tinyllama bench`: arguments (imported while the parser is built, so this module stays light: no NumPy or torch
at import) and `run_bench(args) -> exit status`."""
from __future__ import annotations

import argparse

DEFAULT_BATCHES = "1,8,32"
DEFAULT_PROMPT_LENS = "128,512"
DEFAULT_NEW_TOKENS = 64
DEFAULT_REPEATS = 3
DEFAULT_THREADS = 2
DEFAULT_SPECULATE = 4
DEFAULT_LONG_CONTEXT = 2000
DEFAULT_ROUNDS = 1
QUICK = dict(batch="1,4", prompt_len="32", new_tokens=8, repeats=1, systems="engine,transformers-fp32",
             long_context=96, rounds=1)
SYSTEM_GROUPS = ("engine", "transformers-fp32", "transformers-bf16", "llama.cpp-f32", "llama.cpp-f16",
                 "llama.cpp-bf16", "llama.cpp-q8_0", "llama.cpp-q4_0", "llama.cpp-q4_K_M", "llama.cpp")
# With a GGUF --model: this engine and llama.cpp on that one file
GGUF_SYSTEM_GROUPS = ("engine", "llama.cpp")
ISA_CHOICES = ("auto", "avx512", "avx2", "portable")
WEIGHTS_CHOICES = ("auto", "float32", "int8", "int4", "q4_k_m")
DRAFT_CHOICES = ("lookup", "int8", "int4", "int8+lookup", "int4+lookup")  # engine.generation.speculative's


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Time this engine side by side with transformers (fp32, bf16) and llama.cpp (when "
                      "llama-cpp-python is installed) on the same weights, each system in its own process: load time, "
                      "prefill tokens/s per prompt length, time to first token, decode tokens/s per batch size, peak "
                      "RSS, against this machine's memory-bandwidth floor. Writes results.json and PNG plots.")
    p.add_argument("--model", default=None,
                   help="local folder or Hub repo id (default: random weights of TinyLlama-1.1B's exact shape, "
                        "made locally once), or a GGUF file: then this engine and llama.cpp (system `llama.cpp`) "
                        "run that one file")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--backend", default="numpy", metavar="numpy|triton",
                   help="this engine's backend(s), comma-separated (default numpy)")
    p.add_argument("--isa", default="auto", metavar="LIST",
                   help="the engine's kernel variant(s), comma-separated, from auto (the best this CPU runs), avx512, "
                        "avx2, portable: one engine row each (default auto)")
    p.add_argument("--weights-dtype", default="auto", metavar="LIST",
                   help="the engine's weights: auto (the checkpoint's 16-bit dtype kept), float32 (widened at load), "
                        "int8, int4 (quantized at load), comma-separated for one row each (default auto)")
    p.add_argument("--checkpoint-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the random checkpoint every system loads when no --model is given (default "
                        "bfloat16, as TinyLlama ships)")
    p.add_argument("--long-context", type=int, default=None, metavar="N",
                   help=f"also time batch-1 decode at a context of N tokens and the memory a prefill of that many "
                        f"tokens adds (default {DEFAULT_LONG_CONTEXT}; 0 skips)")
    p.add_argument("--batch", default=None, metavar="LIST", help=f"decode batch sizes (default {DEFAULT_BATCHES})")
    p.add_argument("--prompt-len", default=None, metavar="LIST",
                   help=f"prefill prompt lengths; decode runs after the first (default {DEFAULT_PROMPT_LENS})")
    p.add_argument("--new-tokens", type=int, default=None, metavar="N",
                   help=f"decode steps timed per run (default {DEFAULT_NEW_TOKENS})")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help=f"timed runs after the warm-up; median with min/max (default {DEFAULT_REPEATS})")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="run the whole list of systems N times, round-robin, and report per figure the median over "
                        "the rounds (min/max over every run): this machine's memory bandwidth drifts over minutes, "
                        "and one system measured in a fast spell and another in a slow one compare the spells, not "
                        f"the systems (default {DEFAULT_ROUNDS})")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                   help="threads for every system (BLAS, torch, llama.cpp; default %(default)s)")
    p.add_argument("--systems", default=None, metavar="LIST",
                   help=f"which systems, comma-separated, from {', '.join(SYSTEM_GROUPS)} (default all)")
    p.add_argument("--out", default=None, metavar="DIR", help="where results.json and the plots go "
                                                                "(default bench/out/<timestamp>)")
    p.add_argument("--speculate", type=int, default=DEFAULT_SPECULATE, metavar="N",
                   help="also time this engine's speculative decoding at batch 1 with up to N-token drafts against "
                        "plain decoding (0: skip; default %(default)s)")
    p.add_argument("--draft", default="lookup", choices=DRAFT_CHOICES,
                   help="where those drafts come from: lookup (a prompt repeating a passage; default), int8 or int4 "
                        "(the model's own quantized copy, on your weights: acceptance, draft step cost, verification "
                        "cost, tokens/s against plain decoding)")
    p.add_argument("--quick", action="store_true",
                   help="cut-down model, batches 1,4, prompt 32, 8 new tokens, 1 repeat, engine + transformers "
                        "fp32 only (under a minute)")


def _error(message: str):
    from engine.errors import EngineError  # here, not at the top: importing `engine` loads NumPy

    return EngineError(message)


def int_list(text: str, option: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; EngineError (one line) for anything but positive integers."""
    items = [t.strip() for t in str(text).split(",")]
    try:
        values = [int(t) for t in items]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise _error(f"{option}: expected comma-separated positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def name_list(text: str, option: str, allowed) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if not items or bad:
        raise _error(f"{option}: unknown {', '.join(map(repr, bad)) or 'value ' + repr(text)} "
                          f"(choose from {', '.join(allowed)})")
    return list(dict.fromkeys(items))


def settings_from(args) -> dict:
    """The validated plan: lists parsed, --quick defaults filled in where the user gave none."""
    from bench.systems import ENGINE_BACKENDS

    quick = dict(QUICK) if args.quick else {}

    def pick(name, default):
        given = getattr(args, name)
        return given if given is not None else quick.get(name, default)

    backends = name_list(args.backend, "--backend", ENGINE_BACKENDS)
    isas = name_list(args.isa, "--isa", ISA_CHOICES)
    weights = name_list(args.weights_dtype, "--weights-dtype", WEIGHTS_CHOICES)
    gguf = bool(args.model) and str(args.model).lower().endswith(".gguf")
    default_groups = GGUF_SYSTEM_GROUPS if gguf else [g for g in SYSTEM_GROUPS if g != "llama.cpp"]
    groups = name_list(pick("systems", ",".join(default_groups)), "--systems", SYSTEM_GROUPS)
    engines = [engine_system(b, i, w) for b in backends for i in isas for w in weights
               if b == "numpy" or i == "auto"]
    systems = [s for g in groups for s in (engines if g == "engine" else [g])]
    settings = dict(batches=int_list(pick("batch", DEFAULT_BATCHES), "--batch"),
                    prompt_lens=int_list(pick("prompt_len", DEFAULT_PROMPT_LENS), "--prompt-len"),
                    new_tokens=pick("new_tokens", DEFAULT_NEW_TOKENS), repeats=pick("repeats", DEFAULT_REPEATS),
                    rounds=pick("rounds", DEFAULT_ROUNDS),
                    threads=args.threads, systems=systems, quick=bool(args.quick), speculate=args.speculate,
                    draft=args.draft,
                    long_context=pick("long_context", DEFAULT_LONG_CONTEXT), checkpoint_dtype=args.checkpoint_dtype)
    for key, option in (("new_tokens", "--new-tokens"), ("repeats", "--repeats"), ("rounds", "--rounds"),
                        ("threads", "--threads")):
        if settings[key] < 1:
            raise _error(f"{option} must be >= 1, got {settings[key]}")
    if settings["speculate"] < 0:
        raise _error(f"--speculate must be >= 0, got {settings['speculate']}")
    if settings["long_context"] < 0:
        raise _error(f"--long-context must be >= 0, got {settings['long_context']}")
    return settings


def engine_system(backend: str, isa: str = "auto", weights: str = "auto") -> str:
    """The system name of an engine configuration: engine-numpy, engine-numpy-avx2, engine-numpy-float32, ..."""
    return "-".join(["engine", backend] + [part for part in (isa, weights) if part != "auto"])


def run_bench(args) -> int:
    settings = settings_from(args)  # user errors first, before anything slow
    from bench.run import run

    return run(settings, model=args.model, revision=args.revision, out=args.out)
