"""Soak of `tinyllama serve` under a hostile load: ordinary streaming clients alone, then beside hostile ones.

    python -m bench.soak [--model REF] [--clients 8] [--duration 60] [--warmup 20] [--hostile 6]
                         [--constraint-depth 1000] [--only KIND ...] [--threads 2] [--out DIR] [--quick]

One server (`--max-active clients + 4`, `--max-queue 64`, `--prefix-cache-mb 64`, the other limits at their
defaults), on 127.0.0.1, in its own process:

1. warm-up: `clients` closed-loop streaming clients (random-token prompts of 64-192 tokens, 32-96 greedy tokens past
   EOS) for `warmup` seconds;
2. baseline: the same clients for `duration` seconds, alone: every gap between two consecutive chunks of a stream
   (client-side) is recorded;
3. hostile: the same clients for `duration` seconds beside `hostile` clients looping over: inspections
   (/v1/inspect/attention with the summary, /v1/inspect/lens) and embeddings (/v1/embeddings) of 600 to 2,047
   tokens, one in three left after a second and the others after GIVE_UP_SECONDS; n = 128 (a 400: it can never
   fit) and n = 4 choices, streamed and left after two chunks; constraints at
   the limits (a `$defs` chain `constraint-depth` deep as json_schema and guided_json, a grammar of as many chained
   rules, 100,000 guided_choice options, a regex nothing matches); huge bodies (a prompt just under the 8 MB cap,
   one over it, JSON nested 100,000 deep); streams left after a few tokens; requests left while they wait. The
   hostile clients run in a process of their own (what they cost to make never delays the ordinary clients' clock),
   each one request at a time, a 503 retried after its Retry-After; `--only` keeps some kinds (inspect, choices,
   constraints, bodies, left, embed), to find which one hurts;
4. after: the server is waited idle and its RSS read again.

Reported (results.json under --out): the ordinary clients' p50 / p99 time between chunks in each phase and the
ratio of the p99s (goal: <= 2), their errors (goal: 0), whether the server process survived (goal: 0 crashes) and
the 5xx answers other than 503 it gave (bugs), the hostile requests by kind and HTTP status, and the server's RSS at
the start of the hostile phase and once idle after it (goal: within 10%), with the prefix cache's bytes before and
after (/metrics: what it filled meanwhile is held on purpose, and is also set apart).
Also: the machine's load average before and after, the kernel variant the server runs and the BLAS library.

Default model: random bf16 weights of TinyLlama-1.1B's width with 2 layers (a decode step costs little, so an
inspection or a prefill that stalls the batch shows) and TinyLlama's tokenizer from ../shared/models. --quick:
QUICK_SHAPE, 3 clients, 2 hostile clients, 6 s phases, 50-deep constraints: a check that everything runs (its
timings mean nothing).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from bench.serve import REPO, Server, rss_bytes, wait_idle

QUICK = dict(clients=3, duration=6.0, warmup=2.0, hostile=2, constraint_depth=50)
FULL = dict(clients=8, duration=60.0, warmup=20.0, hostile=6, constraint_depth=1000)
SPARE_PLACES = 4  # places in the batch beyond the ordinary clients' (--max-active clients + this)
MAX_QUEUE = 64
PREFIX_CACHE_MB = 64  # small enough for the warm-up and baseline to fill it: RSS is compared at a full cache

BODY_CAP_MB = 8  # the server's default --max-request-mb
GIVE_UP_SECONDS = 15.0  # a hostile inspection or embedding not answered by then is left (counted "left")
HOSTILE_KINDS = ("inspect", "embed", "choices", "constraints", "bodies", "left")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local folder with a tokenizer (default: random weights of TinyLlama's width, "
                                   "2 layers, TinyLlama's tokenizer)")
    p.add_argument("--clients", type=int, help="ordinary streaming clients (default 8; quick 3)")
    p.add_argument("--duration", type=float, help="seconds of each measured phase (default 60; quick 6)")
    p.add_argument("--warmup", type=float, help="seconds of ordinary load first (default 20; quick 2)")
    p.add_argument("--hostile", type=int, help="hostile clients in the hostile phase (default 6; quick 2)")
    p.add_argument("--constraint-depth", type=int, help="depth of the hostile $defs chains and grammars "
                                                        "(default 1000; quick 50)")
    p.add_argument("--threads", type=int, default=2, help="the server's threads (default %(default)s)")
    p.add_argument("--only", choices=HOSTILE_KINDS, action="append",
                   help="hostile requests of this kind only (may be repeated; default all): to find which one hurts")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the hostile mix (default 0)")
    p.add_argument("--out", help="folder for results.json (default bench/out/soak-<timestamp>)")
    p.add_argument("--quick", action="store_true", help="small model, 3 + 2 clients, 6 s phases")
    p.add_argument("--hostile-worker", metavar="URL", help=argparse.SUPPRESS)  # the hostile clients' process
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.clients, args.hostile, args.threads, args.constraint_depth) < 1:
        p.error("--clients, --hostile, --threads and --constraint-depth must be >= 1")
    if args.duration <= 0 or args.warmup < 0:
        p.error("--duration must be > 0 and --warmup >= 0")
    return args


def soak_model(args) -> str:
    """--model, or a random bf16 checkpoint of SOAK_SHAPE (QUICK_SHAPE with --quick) with TinyLlama's tokenizer."""
    if args.model:
        return args.model
    from bench.checkpoints import QUICK_SHAPE, TINYLLAMA_SHAPE, random_checkpoint
    from bench.llamacpp import TOKENIZER_FILES, shared_tokenizer_dir

    tokenizer = shared_tokenizer_dir()
    if tokenizer is None:
        raise SystemExit("bench.soak: the default model borrows TinyLlama's tokenizer from ../shared/models "
                         "(or $TINYLLAMA_SHARED_MODELS), which is absent; pass --model FOLDER with a tokenizer")
    shape = QUICK_SHAPE if args.quick else dict(TINYLLAMA_SHAPE, num_hidden_layers=2)
    checkpoint = random_checkpoint(shape, dtype="bfloat16", name=None if args.quick else "tinyllama-width-2-layers")
    folder = checkpoint.with_name(checkpoint.name + "-tokenizer")
    folder.mkdir(exist_ok=True)
    for f in list(checkpoint.iterdir()) + [tokenizer / name for name in TOKENIZER_FILES]:
        link = folder / f.name
        if f.exists() and not link.exists():
            link.symlink_to(f)
    return str(folder)


# ---- the ordinary clients -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Request sizes in tokens, fitted to the model's window (a window of 2,048: the issue's sizes)."""

    vocab: int
    prompt: tuple[int, int] = (64, 192)  # ordinary prompts
    reply: tuple[int, int] = (32, 96)  # ordinary replies
    inspect: tuple[int, int] = (600, 2047)  # inspections
    choices_prompt: int = 200  # the prompt of n choices
    left_prompt: int = 64  # the prompt of requests left early
    left_reply: int = 1000

    @classmethod
    def for_window(cls, window: int, vocab: int) -> "Sizes":
        if window >= 2048:
            return cls(vocab)
        w = window
        return cls(vocab, prompt=(w // 8, w // 4), reply=(w // 8, w // 4), inspect=(w // 3, w - 1),
                   choices_prompt=w // 4, left_prompt=w // 8, left_reply=w // 2)


def random_prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


class Phase:
    """One measured phase: its window, the ordinary clients' gaps and errors, the hostile requests' outcomes."""

    def __init__(self, name: str, start: float, end: float):
        self.name, self.start, self.end = name, start, end
        self.gaps: list[float] = []
        self.tokens = 0
        self.errors: list[str] = []
        self.hostile: dict[str, dict[str, int]] = {}

    def count(self, kind: str, outcome) -> None:
        kinds = self.hostile.setdefault(kind, {})
        kinds[str(outcome)] = kinds.get(str(outcome), 0) + 1


async def ordinary_request(client, url: str, rng: random.Random, sizes: Sizes, phase: Phase) -> None:
    """Stream one completion; record the gaps between its chunks that fall inside the phase, or its error."""
    prompt = random_prompt(rng, sizes.vocab, rng.randint(*sizes.prompt))
    max_tokens = rng.randint(*sizes.reply)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    seen, last, done = 0, None, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                phase.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    phase.errors.append(f"error chunk: {chunk['error']}")
                    return
                now = time.perf_counter()
                tokens = chunk["usage"]["completion_tokens"]
                if tokens > seen:
                    if last is not None and phase.start <= last and now <= phase.end:
                        phase.gaps.append(now - last)
                    if phase.start <= now <= phase.end:
                        phase.tokens += tokens - seen
                    seen, last = tokens, now
                if now >= phase.end:
                    return  # the phase is over: leave (the server cancels the rest)
    except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop on them
        phase.errors.append(f"{type(e).__name__}: {e}")
        return
    if not done or seen != max_tokens:
        phase.errors.append(f"stream ended after {seen}/{max_tokens} tokens without [DONE]")


# ---- the hostile clients ------------------------------------------------------------------------------------------
def def_chain(depth: int) -> dict:
    """A JSON schema whose $defs chain d0 -> d1 -> ... -> d<depth> (issue 34, defect 1's crash at ~1,000)."""
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def hostile_bodies(depth: int) -> list[tuple[str, str, bytes]]:
    """(kind, path, body) of the constraint and huge-body requests, encoded once."""
    chain = def_chain(depth)
    grammar = "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(depth)) + f'r{depth}: "a"\n'
    big_prompt = "w " * (BODY_CAP_MB * 2 ** 20 // 2 - 4096)  # just under the cap: refused from its length
    bodies = [
        ("json_schema_chain", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 16, "response_format": {
                                                           "type": "json_schema",
                                                           "json_schema": {"name": "chain", "schema": chain}}}),
        ("guided_json_chain", "/v1/completions", {"prompt": "Hi", "max_tokens": 16, "guided_json": chain}),
        ("grammar_chain", "/v1/completions", {"prompt": "Hi", "max_tokens": 16, "guided_grammar": grammar}),
        ("choice_100k", "/v1/completions", {"prompt": "Hi", "max_tokens": 8,
                                            "guided_choice": [f"option {i}" for i in range(100_000)]}),
        ("regex_empty", "/v1/completions", {"prompt": "Hi", "max_tokens": 8, "guided_regex": r"[^\s\S]"}),
        ("body_under_cap", "/v1/completions", {"prompt": big_prompt}),
        ("body_over_cap", "/v1/completions", b'{"prompt": "' + b"x" * (BODY_CAP_MB * 2 ** 20 + 10) + b'"}'),
        ("nested_100k", "/v1/completions", b'{"prompt": "a", "metadata": ' + b"[" * 100_000 + b"]" * 100_000
         + b"}"),
    ]
    return [(kind, path, body if isinstance(body, bytes) else json.dumps(body).encode())
            for kind, path, body in bodies]


async def hostile_client(client, url: str, rng: random.Random, sizes: Sizes, bodies: list, phase: Phase,
                         spare: int, kinds: tuple[str, ...] = HOSTILE_KINDS) -> None:
    """Loop over the hostile requests of `kinds` until the phase ends, counting each outcome by kind. A 503 is
    retried after its Retry-After, as OpenAI's clients do (hammering it would only measure this process's CPU)."""
    import httpx

    vocab = sizes.vocab
    turn = 0
    constraint_bodies = [b for b in bodies if not b[0].startswith(("body", "nested"))]
    huge_bodies = [b for b in bodies if b[0].startswith(("body", "nested"))]
    while time.perf_counter() < phase.end:
        turn += 1
        kind = rng.choice(kinds)
        pick = {"inspect": 0, "embed": 0, "choices": 1, "constraints": 2, "bodies": 2, "left": rng.choice([3, 4])}[kind]
        try:
            if pick == 0:  # an inspection or an embedding of a long input, one in three left after a second
                path = "/v1/embeddings" if kind == "embed" else rng.choice(["/v1/inspect/attention",
                                                                             "/v1/inspect/lens"])
                ids = random_prompt(rng, vocab, rng.randint(*sizes.inspect))
                kind = path.rsplit("/", 1)[1] + (" (left)" if turn % 3 == 0 else "")
                timeout = httpx.Timeout(600, read=1.0 if turn % 3 == 0 else GIVE_UP_SECONDS)
                body = {"input": ids} if kind.startswith("embeddings") else {"prompt": ids, "layer": 0}
                r = await client.post(url + path, json=body, timeout=timeout)
                phase.count(kind, r.status_code)
                if r.status_code == 503:
                    kind = None  # answered: waiting to retry
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            elif pick == 1:  # n choices: 128 never fits; `spare` fit, streamed and left after two chunks
                n = 128 if turn % 2 else spare
                body = {"prompt": random_prompt(rng, vocab, sizes.choices_prompt), "max_tokens": 48, "n": n,
                        "ignore_eos": True, "stream": n != 128}
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    chunks = 0
                    async for line in r.aiter_lines():
                        chunks += line.startswith("data: {")
                        if chunks >= 2:
                            break
                    phase.count(f"n={n}", r.status_code)
            elif pick == 2:  # a constraint at the limits, or a huge body
                kind, path, body = rng.choice(constraint_bodies if kind == "constraints" else huge_bodies)
                r = await client.post(url + path, content=body, headers={"Content-Type": "application/json"})
                phase.count(kind, r.status_code)
            elif pick == 3:  # a stream left after a few tokens
                body = {"prompt": random_prompt(rng, vocab, sizes.left_prompt), "max_tokens": sizes.left_reply,
                        "ignore_eos": True, "stream": True}
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    chunks = 0
                    async for line in r.aiter_lines():
                        chunks += line.startswith("data: {")
                        if chunks >= 3:
                            break
                    phase.count("stream (left)", r.status_code)
            else:  # a whole response not waited for
                body = {"prompt": random_prompt(rng, vocab, sizes.left_prompt), "max_tokens": sizes.left_reply,
                        "ignore_eos": True}
                r = await client.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(600, read=0.3))
                phase.count("waiting (left)", r.status_code)
        except httpx.ReadTimeout:
            phase.count(kind if pick == 0 else "waiting (left)", "left")
        except asyncio.CancelledError:  # the phase ended with this request still running: the server cancels it
            if kind is not None:
                phase.count(kind, "unfinished")
            raise
        except Exception as e:  # noqa: BLE001 - counted: a hostile client only tells what happened
            phase.count(f"pick {pick}", type(e).__name__)


async def ordinary_clients(url: str, clients: int, phase: Phase, sizes: Sizes, seed: int) -> None:
    """`clients` ordinary clients (closed loops) until the phase's end."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30),
                                 limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def ordinary(i: int):
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < phase.end:
                await ordinary_request(client, url, rng, sizes, phase)

        await asyncio.gather(*(ordinary(i) for i in range(clients)))


async def hostile_clients(url: str, hostile: int, phase: Phase, sizes: Sizes, depth: int, kinds: tuple[str, ...],
                          seed: int) -> None:
    """`hostile` hostile clients until the phase's end; requests still running then are left (the server
    cancels them)."""
    import httpx

    bodies = hostile_bodies(depth)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30),
                                 limits=httpx.Limits(max_connections=hostile + 4)) as client:
        tasks = [asyncio.create_task(hostile_client(client, url, random.Random(seed * 1000 + 500 + i), sizes,
                                                    bodies, phase, SPARE_PLACES, kinds)) for i in range(hostile)]
        await asyncio.sleep(max(0.0, phase.end - time.perf_counter()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def hostile_worker(args) -> None:
    """The hostile clients in a process of their own (--hostile-worker URL), so that what they cost on the client
    side (encoding 8 MB bodies, say) never delays the ordinary clients' clocks; prints their outcomes as JSON."""
    config = json.loads((Path(args.model) / "config.json").read_text())
    sizes = Sizes.for_window(config["max_position_embeddings"], config["vocab_size"])
    now = time.perf_counter()
    phase = Phase("hostile", now, now + args.duration)
    asyncio.run(hostile_clients(args.hostile_worker, args.hostile, phase, sizes, args.constraint_depth,
                                tuple(args.only or HOSTILE_KINDS), args.seed))
    print(json.dumps(phase.hostile))


def run_phase(url: str, args, model_ref: str, phase: Phase, sizes: Sizes, hostile: int, seed: int) -> None:
    """The ordinary clients here and, with `hostile` > 0, the hostile ones in a worker process, until the phase's
    end (the worker's outcomes go to phase.hostile)."""
    worker = None
    if hostile:
        command = [sys.executable, "-m", "bench.soak", "--hostile-worker", url, "--model", model_ref,
                   "--hostile", str(hostile), "--duration", str(phase.end - time.perf_counter()),
                   "--constraint-depth", str(args.constraint_depth), "--seed", str(seed)]
        for kind in args.only or ():
            command += ["--only", kind]
        worker = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    asyncio.run(ordinary_clients(url, args.clients, phase, sizes, seed))
    if worker is not None:
        out, _ = worker.communicate(timeout=600)
        phase.hostile = json.loads(out.strip().splitlines()[-1]) if worker.returncode == 0 else {
            "hostile worker": {f"exit {worker.returncode}": 1}}


# ---- the run --------------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(phase: Phase) -> dict:
    return {"gaps": len(phase.gaps), "tokens": phase.tokens, "gap_p50_s": percentile(phase.gaps, 0.5),
            "gap_p99_s": percentile(phase.gaps, 0.99), "gap_max_s": max(phase.gaps, default=None),
            "errors": len(phase.errors), "error_samples": phase.errors[:5], "hostile": phase.hostile}


def server_metrics(url: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def machine() -> dict:
    import platform

    from engine.runtime import blas, native

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "kernel_variant": native.status().isa, "kernels": native.status().detail, "blas": blas.blas_info(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def report(results: dict) -> str:
    b, h, s = results["baseline"], results["hostile"], results["summary"]

    def ms(x):
        return "-" if x is None else f"{1000 * x:.1f} ms"

    lines = [f"model: {results['model']}  clients: {results['settings']['clients']} ordinary + "
             f"{results['settings']['hostile']} hostile  phases: {results['settings']['duration']:g} s",
             f"baseline: gap p50 {ms(b['gap_p50_s'])}  p99 {ms(b['gap_p99_s'])}  max {ms(b['gap_max_s'])}  "
             f"({b['gaps']} gaps, {b['errors']} errors)",
             f"hostile:  gap p50 {ms(h['gap_p50_s'])}  p99 {ms(h['gap_p99_s'])}  max {ms(h['gap_max_s'])}  "
             f"({h['gaps']} gaps, {h['errors']} errors)",
             "hostile requests: " + "; ".join(f"{k} {v}" for k, v in sorted(h["hostile"].items())),
             f"p99 ratio: {s['p99_ratio']:.2f} (goal <= 2)  crashes: {s['crashes']}  5xx other than 503: "
             f"{s['server_errors']}  ordinary errors: {s['ordinary_errors']}",
             f"RSS at the hostile phase's start {results['rss_before_bytes'] / 1e6:.0f} MB, idle after it "
             f"{results['rss_after_bytes'] / 1e6:.0f} MB: {100 * s['rss_growth']:+.1f}% (goal within 10%); prefix "
             f"cache {results['prefix_cache_before_bytes'] / 1e6:.0f} -> {results['prefix_cache_bytes'] / 1e6:.0f} MB "
             f"(beside it {100 * s['rss_growth_beside_prefix_cache']:+.1f}%)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.hostile_worker:
        hostile_worker(args)
        return 0
    model_ref = soak_model(args)
    out = Path(args.out or REPO / "bench" / "out" / time.strftime("soak-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(model_ref) / "config.json").read_text())
    sizes = Sizes.for_window(config["max_position_embeddings"], config["vocab_size"])
    load_before = os.getloadavg()

    server_args = SimpleNamespace(clients=args.clients + SPARE_PLACES, threads=args.threads, weights_dtype=None)
    server = Server(server_args, model_ref, "--max-queue", str(MAX_QUEUE), "--prefix-cache-mb", str(PREFIX_CACHE_MB),
                    "--log-level", "error")
    results = {"model": model_ref, "settings": {k: getattr(args, k) for k in (
        "clients", "duration", "warmup", "hostile", "constraint_depth", "threads", "seed", "quick", "only")},
        "server_flags": {"max_active": args.clients + SPARE_PLACES, "max_queue": MAX_QUEUE,
                         "prefix_cache_mb": PREFIX_CACHE_MB}, "machine": machine()}
    try:
        now = time.perf_counter()
        print(f"warm-up: {args.clients} ordinary clients, {args.warmup:g} s ...", flush=True)
        run_phase(server.url, args, model_ref, Phase("warm-up", now, now + args.warmup), sizes, 0, args.seed)
        now = time.perf_counter()
        baseline = Phase("baseline", now, now + args.duration)
        print(f"baseline: {args.clients} ordinary clients alone, {args.duration:g} s ...", flush=True)
        run_phase(server.url, args, model_ref, baseline, sizes, 0, args.seed + 1)
        wait_idle(server.url)
        results["rss_before_bytes"] = rss_bytes(server.process.pid)
        before = server_metrics(server.url)
        now = time.perf_counter()
        hostile = Phase("hostile", now, now + args.duration)
        print(f"hostile: {args.clients} ordinary + {args.hostile} hostile clients, {args.duration:g} s ...",
              flush=True)
        run_phase(server.url, args, model_ref, hostile, sizes, args.hostile, args.seed + 2)
        alive = server.process.poll() is None
        if alive:
            wait_idle(server.url, timeout=600)
            time.sleep(1.0)
            after = server_metrics(server.url)
        else:
            after = before
        results["rss_after_bytes"] = rss_bytes(server.process.pid) or 0
        results["prefix_cache_bytes"] = after.get("tinyllama_prefix_cache_bytes", 0)
        results["prefix_cache_before_bytes"] = before.get("tinyllama_prefix_cache_bytes", 0)
        results["baseline"], results["hostile"] = summary(baseline), summary(hostile)
        server_errors = sum(v - before.get(k, 0) for k, v in after.items()
                            if k.startswith("tinyllama_request_errors_total") and '"5' in k and '"503"' not in k)
        b99, h99 = results["baseline"]["gap_p99_s"], results["hostile"]["gap_p99_s"]
        results["summary"] = {
            "p99_ratio": h99 / b99 if b99 and h99 else float("nan"), "crashes": 0 if alive else 1,
            "server_exit_status": None if alive else server.process.returncode, "server_errors": int(server_errors),
            "ordinary_errors": len(baseline.errors) + len(hostile.errors),
            "rss_growth": (results["rss_after_bytes"] - results["rss_before_bytes"]) / results["rss_before_bytes"],
            # what the prefix cache filled meanwhile (up to its --prefix-cache-mb) is held on purpose: set apart
            "rss_growth_beside_prefix_cache": (results["rss_after_bytes"] - results["rss_before_bytes"]
                                               - results["prefix_cache_bytes"] + results["prefix_cache_before_bytes"])
                                              / results["rss_before_bytes"]}
    finally:
        results["server_log_tail"] = server.text()[-4000:]
        status = server.stop()
    results["machine"]["load_average_before"] = load_before
    results["machine"]["load_average_after"] = os.getloadavg()
    results["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(report(results))
    print(f"results: {out / 'results.json'} (server exit status {status})")
    s = results["summary"]
    return 0 if s["crashes"] == 0 and s["server_errors"] == 0 and s["ordinary_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
