"""`python -m bench.structured`: what structured output costs, and whether it always holds.

1. Mask cost: the scheduler's per-step decode time with and without a nested ~20-field JSON Schema, batch 1 and batch
   8, same prompt and same number of tokens at the same positions, runs alternated in one process (the forward costs
   the same whatever the token values; the difference is the masks, their application and the matchers' advance). The
   constrained runs are timed with the masks computed on a thread while the forward runs (the default) and without.
2. Time to the first token of a constrained request, schema compilation included, against an unconstrained one.
3. Validity: 200 seeded samples at temperature 1 per constraint (the schema: jsonschema-validated; a regex: fullmatch;
   a choice: membership) on a small random model with TinyLlama's real tokenizer, where nothing but the constraint
   makes the output valid.

1 and 2 run on random bf16 weights of TinyLlama-1.1B's shape with its real tokenizer (the checkpoint `tinyllama bench`
makes); --quick uses the small shape. Results: JSON on stdout and in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

SCHEMA = {  # 20 leaf fields: nested objects, arrays, enums, integers, numbers, booleans, strings with patterns
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "name": {"type": "string", "maxLength": 24},
        "status": {"enum": ["active", "suspended", "closed"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "verified": {"type": "boolean"},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,10}\\.(com|org|net)$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 30},
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["FR", "DE", "US", "JP", "BR"]},
                "geo": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                         "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                        "required": ["lat", "lon"], "additionalProperties": False},
            },
            "required": ["street", "city", "zip", "country", "geo"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array", "maxItems": 2,
            "items": {"type": "object",
                      "properties": {"sku": {"type": "string", "pattern": "^[A-Z0-9]{6}$"},
                                     "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                                     "priority": {"enum": ["low", "normal", "high"]}},
                      "required": ["sku", "qty", "priority"], "additionalProperties": False},
        },
    },
    "required": ["id", "name", "status", "age", "score", "verified", "email", "tags", "address", "orders"],
    "additionalProperties": False,
}
REGEX = r"(\+33|0)[1-9]( [0-9]{2}){4}"
CHOICES = ["positive", "negative", "neutral", "mixed feelings", "not sure"]
PROMPT = "Write a customer record as JSON:"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder with a tokenizer (default: random bf16 TinyLlama-shape weights with "
                                   "TinyLlama's tokenizer)")
    p.add_argument("--quick", action="store_true", help="the small shape instead of TinyLlama's (a smoke run)")
    p.add_argument("--tokens", type=int, default=48, help="decode steps timed per run (default 48)")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds of every timed run (default 3)")
    p.add_argument("--samples", type=int, default=200, help="validity samples per constraint (default 200)")
    p.add_argument("--skip-timing", action="store_true", help="validity only")
    p.add_argument("--skip-validity", action="store_true", help="timing only")
    p.add_argument("--out", help="also write the JSON results to this file")
    return p.parse_args(argv)


# ---- 1. mask cost -----------------------------------------------------------------------------------------------
def timed_steps(model, prompt_ids, batch: int, tokens: int, constrained: bool, overlap: bool = True,
                seed: int = 0) -> tuple[list[float], list[list[int]]]:
    """Seconds of each scheduler step in which all `batch` sequences decode (prefill excluded): the first `tokens`
    decode steps, with or without the schema; and each sequence's tokens."""
    from engine.generation.scheduler import Scheduler

    scheduler = Scheduler(model, max_active=batch)
    scheduler.overlap_masks = overlap
    extra = {"json_schema": SCHEMA} if constrained else {"ignore_eos": True}
    requests = [scheduler.submit(prompt_ids, max_new_tokens=tokens + 1, temperature=1.0, seed=seed + i, **extra)
                for i in range(batch)]
    while any(r.status != "decoding" for r in requests):
        scheduler.step()  # the prefill, and the step that samples each first token
    times = []
    while len(times) < tokens and all(not r.finished for r in requests):
        t0 = time.perf_counter()
        scheduler.step()
        times.append(time.perf_counter() - t0)
    for r in requests:
        if not r.finished:
            r.cancel()
    return times, [list(r.state.generated) for r in requests]


def mask_only(model, outputs: list[list[int]]) -> tuple[list[float], list[float]]:
    """Seconds per step of (the batch's masks alone: one parallel llguidance call, no forward) and of (the masks,
    applying them to a logits row per sequence and advancing the matchers: all the constraint adds to a step),
    replaying the tokens a constrained run chose (`outputs`: each sequence's tokens)."""
    import numpy as np

    from engine.generation.constraints import MaskBatch
    from engine.generation.state import default_options

    options = default_options(model, json_schema=SCHEMA)
    states = [options.constraint.start() for _ in outputs]
    logits = np.random.default_rng(0).standard_normal(model.config.vocab_size).astype(np.float32)
    masks, total = [], []
    for step in range(min(len(tokens) for tokens in outputs) - 1):
        t0 = time.perf_counter()
        MaskBatch([(s, []) for s in states], overlap=False).wait()
        t1 = time.perf_counter()
        for s, tokens in zip(states, outputs):
            s.apply(logits)
            s.consume(tokens[step])
        masks.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    return masks, total


def mask_cost(model, prompt_ids, batch: int, tokens: int, rounds: int) -> dict:
    """Median step seconds: unconstrained, constrained (masks overlapped with the forward), constrained (masks
    computed before it), and the masks alone; runs alternated `rounds` times."""
    runs = {"plain": [], "constrained": [], "constrained_serial": []}
    lengths, masks, work = [], [], []
    for _ in range(rounds):
        constrained, outputs = timed_steps(model, prompt_ids, batch, tokens, True)
        n = len(constrained)  # the shortest output bounds the steps every sequence decodes
        lengths.append(n)
        runs["constrained"] += constrained
        runs["plain"] += timed_steps(model, prompt_ids, batch, n, False)[0]
        runs["constrained_serial"] += timed_steps(model, prompt_ids, batch, n, True, overlap=False)[0]
        m, w = mask_only(model, outputs)
        masks += m
        work += w
    out = {name: statistics.median(values) for name, values in runs.items()}
    out["mask_only"] = statistics.median(masks)
    out["mask_max"] = max(masks)
    out["constraint_work"] = statistics.median(work)  # masks + applying them + advancing the matchers
    out["constraint_work_share"] = out["constraint_work"] / out["plain"]
    out["steps_timed_per_run"] = lengths
    out["overhead"] = out["constrained"] / out["plain"] - 1
    out["overhead_serial"] = out["constrained_serial"] / out["plain"] - 1
    out["mask_share"] = out["mask_only"] / out["plain"]
    return out


# ---- 2. time to first token -------------------------------------------------------------------------------------
def first_token_seconds(model, prompt_ids, constrained: bool) -> float:
    """Submit to first token; the constrained request compiles its schema inside the timed span."""
    from engine.generation.scheduler import Scheduler
    from engine.generation.state import default_options

    scheduler = Scheduler(model)
    t0 = time.perf_counter()
    options = default_options(model, max_new_tokens=2, temperature=1.0, seed=0,
                              **({"json_schema": json.dumps(SCHEMA)} if constrained else {}))
    request = scheduler.submit(prompt_ids, options)
    while not request.events:
        scheduler.step()
    elapsed = time.perf_counter() - t0
    request.cancel()
    return elapsed


def time_to_first_token(model, prompt_ids, rounds: int) -> dict:
    from engine.generation.state import default_options

    default_options(model, json_object=True)  # llguidance's tokenizer, built once per model (a server does it at load)
    plain, constrained = [], []
    for _ in range(rounds + 1):
        plain.append(first_token_seconds(model, prompt_ids, False))
        constrained.append(first_token_seconds(model, prompt_ids, True))
    plain, constrained = plain[1:], constrained[1:]  # the first round warms caches
    t0 = time.perf_counter()
    default_options(model, json_schema=json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t0
    return {"plain": statistics.median(plain), "constrained": statistics.median(constrained),
            "ratio": statistics.median(constrained) / statistics.median(plain), "schema_compile": compile_s,
            "prompt_tokens": len(prompt_ids)}


# ---- 3. validity ------------------------------------------------------------------------------------------------
def small_model(folder: Path) -> Path:
    """A small random Llama (transformers) with TinyLlama's real tokenizer and a 2048-token window."""
    import torch
    import transformers

    from bench.llamacpp import TOKENIZER_FILES, shared_tokenizer_dir

    tokenizer = shared_tokenizer_dir()
    if tokenizer is None:
        raise SystemExit("bench.structured: TinyLlama's tokenizer (../shared/models) is absent")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            (folder / name).write_bytes((tokenizer / name).read_bytes())
    return folder


def validity(samples: int) -> dict:
    """Fraction of valid outputs per constraint over `samples` seeded draws at temperature 1 (batches of 25)."""
    import jsonschema

    import engine
    from engine.generation.scheduler import Scheduler
    from engine.generation.state import default_options

    with tempfile.TemporaryDirectory() as tmp:
        model = engine.load_model(str(small_model(Path(tmp))))
        model.tokenizer  # read while the folder exists
    prompt = model.prompt_ids(PROMPT)
    checks = {
        "json_schema": (SCHEMA, lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
        "regex": (REGEX, lambda text: re.fullmatch(REGEX, text) is not None),
        "choice": (CHOICES, lambda text: text in CHOICES),
    }
    out = {}
    for kind, (value, valid) in checks.items():
        results = []
        for start in range(0, samples, 25):
            scheduler = Scheduler(model, max_active=25)
            requests = [scheduler.submit(prompt, default_options(model, temperature=1.0, seed=seed,
                                                                 max_new_tokens=1500, **{kind: value}))
                        for seed in range(start, min(samples, start + 25))]
            for _ in scheduler.run():
                pass
            results += [r.result for r in requests]
        good = 0
        for r in results:
            try:
                good += bool(valid(r.text))
            except (ValueError, jsonschema.ValidationError):
                pass
        out[kind] = {"samples": len(results), "valid": good,
                     "stop_reasons": dict(sorted({s: sum(r.stop_reason == s for r in results)
                                                  for s in {r.stop_reason for r in results}}.items())),
                     "mean_tokens": statistics.mean(len(r.token_ids) for r in results),
                     "example": results[0].text}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    report = {"machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
                          "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}}
    if not args.skip_timing:
        import engine
        from bench.serve import served_model

        folder = served_model(SimpleNamespace(model=args.model, quick=args.quick))
        model = engine.load_model(folder)
        prompt_ids = model.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
        report["model"] = {"folder": folder, "weights_dtype": model.weights_dtype,
                           "hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers}
        for batch in (1, 8):
            report[f"batch_{batch}"] = mask_cost(model, prompt_ids, batch, args.tokens, args.rounds)
            print(f"batch {batch}: {json.dumps(report[f'batch_{batch}'])}", file=sys.stderr)
        report["time_to_first_token"] = time_to_first_token(model, prompt_ids, args.rounds)
        print(f"first token: {json.dumps(report['time_to_first_token'])}", file=sys.stderr)
        report["machine"]["load_average_after"] = os.getloadavg()
    if not args.skip_validity:
        report["validity"] = validity(args.samples)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
