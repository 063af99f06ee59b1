"""Load benchmark of `tinyllama serve`: N concurrent streaming clients against a server on this machine, compared with
the in-process Scheduler running the same workload at the same batch, in the same run.

    python -m bench.serve [--model REF] [--clients 32] [--duration 120] [--rounds 3] [--prompt-len 128]
                          [--max-tokens 64] [--range-ratio 0.5] [--warmup 90] [--threads 2] [--weights-dtype D]
                          [--out DIR] [--quick]

The workload (both sides): `clients` sequences at once, each a prompt of random token ids (BOS first) and greedy
tokens past EOS, their lengths drawn uniformly within `range_ratio` of `prompt_len` and `max_tokens` (vLLM's
`--random-range-ratio`; the same seeded stream of requests on both sides); a sequence that ends is replaced at once
(a closed loop). Lengths vary so that the sequences do not stay in lockstep: with equal lengths every sequence ends
in the same step and all start again together, so tokens/s over a window depends on where the window falls in that
cycle (prefill of every prompt at once, then decoding only), not on the system measured. Tokens are counted as they
are generated within the timed window of `duration` seconds (the server's streams carry vLLM's
`continuous_usage_stats`, so partly streamed requests count exactly), after a warm-up that outlasts the first
prefill of all `clients` prompts together.

1. In-process: a worker process loads the model and runs the workload on `engine.Scheduler` (max_active = clients).
2. Server: `python -m engine serve --max-active clients` in its own process; `rounds` rounds of `clients` asyncio
   clients (httpx, SSE parsed by hand) streaming /v1/completions for `duration` seconds each. Per round: aggregate
   tokens/s, time to first token p50/p95 (client-side, request sent to first content), completed requests, errors
   (non-200, broken streams), and the server's RSS after the round (RSS at start: after loading, before any request).
3. Report: the server's tokens/s as a fraction of the in-process figure (the issue's goal: >= 85% at 32 clients on
   TinyLlama's shape, 0 errors), RSS growth from round 1 to the last (goal: within 5%). results.json under --out.

Against a running server or cluster (`--url URL --conversations C --turns T [--api completions]`): the same
conversations once, reporting per turn the share of conversations whose prompt came partly from a prefix cache
(cached_tokens > 0), which replica answered each turn (a cluster's x-tinyllama-replica header) and the router's
decisions from the cluster's /metrics; bench.serve_cluster runs it against clusters it starts.

Multi-turn mode (`--conversations C --turns T`): C concurrent chat conversations of T turns each, every turn
re-sending the whole history plus a new user message (as chat UIs do) to /v1/chat/completions and streaming a reply
of `--reply-tokens` greedy tokens (past EOS); the same seeded conversations against a server with the prefix cache
(the default) and one with `--no-prefix-cache`, one after the other in the same run. Per turn: time to first token
(mean over conversations), prompt tokens and `usage.prompt_tokens_details.cached_tokens`; per server: aggregate
tokens/s (every reply token over the wall time of all conversations), the prefilled / cached prompt-token counters
from /metrics, and an `n` = 4 request on a fresh prompt showing that four choices cost one prefill. The history
grows by a user message of `--user-words` words and a reply per turn, after a system prompt of `--system-words`
words (defaults: about 1,500 tokens at the 8th turn).

Default model: random weights of TinyLlama-1.1B's shape (bench.checkpoints) with TinyLlama's tokenizer borrowed
from ../shared/models (the server needs one). --quick: the small QUICK_SHAPE model, 4 clients, 3 s rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = dict(clients=4, duration=3.0, prompt_len=32, max_tokens=16, warmup=1.0)
FULL = dict(clients=32, duration=120.0, prompt_len=128, max_tokens=64, warmup=90.0)
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local folder or Hub repo id with a tokenizer (default: random weights of "
                                   "TinyLlama-1.1B's shape with TinyLlama's tokenizer)")
    p.add_argument("--clients", type=int, help="concurrent streaming clients = the batch (default 32; quick 4)")
    p.add_argument("--duration", type=float, help="seconds per round (default 120; quick 3)")
    p.add_argument("--rounds", type=int, default=3, help="server rounds (default %(default)s)")
    p.add_argument("--prompt-len", type=int, help="mean prompt tokens per request (default 128; quick 32)")
    p.add_argument("--max-tokens", type=int, help="mean tokens generated per request (default 64; quick 16)")
    p.add_argument("--range-ratio", type=float, default=0.5,
                   help="lengths drawn uniformly in [L * (1 - r), L * (1 + r)] (vLLM's --random-range-ratio; "
                        "default %(default)s; 0: every request the same)")
    p.add_argument("--warmup", type=float, help="seconds of the workload before each timed window (default 90; "
                                                "quick 1)")
    p.add_argument("--threads", type=int, default=2, help="threads of the server and the in-process worker "
                                                          "(OMP/OpenBLAS; default %(default)s)")
    p.add_argument("--weights-dtype", help="passed to `tinyllama serve --weights-dtype` and to load_model "
                                           "(weights_dtype=) in the in-process worker")
    p.add_argument("--out", help="folder for results.json (default bench/out/serve-<timestamp>)")
    p.add_argument("--quick", action="store_true", help="small model, 4 clients, 3 s rounds (under a minute)")
    p.add_argument("--conversations", type=int, metavar="C",
                   help="multi-turn mode: C concurrent conversations (with --turns), cache on and off")
    p.add_argument("--turns", type=int, default=8, metavar="T", help="turns per conversation (default %(default)s)")
    p.add_argument("--reply-tokens", type=int, default=64, help="tokens per reply in multi-turn mode "
                                                                "(default %(default)s)")
    p.add_argument("--system-words", type=int, default=230, help="words of the system prompt in multi-turn mode "
                                                                 "(default %(default)s)")
    p.add_argument("--user-words", type=int, default=60, help="words of each user message in multi-turn mode "
                                                              "(default %(default)s)")
    p.add_argument("--url", help="multi-turn mode against a server or cluster already running at URL (e.g. `tinyllama "
                                 "serve --replicas 2`): the conversations once, nothing started or compared")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or None,
                   help="--url: the server's API key (default $OPENAI_API_KEY)")
    p.add_argument("--api", choices=("chat", "completions"), default="chat",
                   help="multi-turn mode: chat turns (default), or the conversation as one completion prompt per "
                        "turn (a model without a chat template)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the in-process side, in its process
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("clients", "rounds", "prompt_len", "max_tokens", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.duration <= 0 or args.warmup < 0:
        p.error("--duration must be > 0 and --warmup >= 0")
    if args.conversations is not None and min(args.conversations, args.turns, args.reply_tokens,
                                              args.system_words, args.user_words) < 1:
        p.error("--conversations, --turns, --reply-tokens, --system-words and --user-words must be >= 1")
    if not 0 <= args.range_ratio < 1:
        p.error("--range-ratio must be in [0, 1)")
    if args.url is not None and args.conversations is None:
        p.error("--url runs the multi-turn workload: give --conversations C (and --turns T)")
    return args


# ---- the model folder ---------------------------------------------------------------------------------------------
def served_model(args) -> str:
    """--model, or a random bf16 checkpoint of the benchmark's shape (the one `tinyllama bench` loads: TinyLlama ships
    bf16) with TinyLlama's tokenizer beside it."""
    if args.model:
        return args.model
    from bench.checkpoints import QUICK_SHAPE, TINYLLAMA_SHAPE, random_checkpoint
    from bench.llamacpp import TOKENIZER_FILES, shared_tokenizer_dir

    tokenizer = shared_tokenizer_dir()
    if tokenizer is None:
        raise SystemExit("bench.serve: the default model borrows TinyLlama's tokenizer from ../shared/models "
                         "(or $TINYLLAMA_SHARED_MODELS), which is absent; pass --model FOLDER with a tokenizer")
    checkpoint = random_checkpoint(QUICK_SHAPE if args.quick else TINYLLAMA_SHAPE, dtype="bfloat16")
    folder = checkpoint.with_name(checkpoint.name + "-tokenizer")
    folder.mkdir(exist_ok=True)
    for f in list(checkpoint.iterdir()) + [tokenizer / name for name in TOKENIZER_FILES]:
        link = folder / f.name
        if f.exists() and not link.exists():
            link.symlink_to(f)
    return str(folder)


def thread_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads), "TINYLLAMA_NUM_THREADS": str(threads)}


def length_range(mean: int, ratio: float) -> tuple[int, int]:
    """The lengths drawn for a mean and a range ratio: [mean * (1 - ratio), mean * (1 + ratio)], at least 1."""
    return max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))


def requests(prompt_len: int, max_tokens: int, ratio: float, vocab: int = 32000, seed: int = 0):
    """An endless stream of (prompt, max_tokens): BOS then random token ids, lengths uniform over length_range (the
    same stream on both sides)."""
    rng = random.Random(seed)
    prompt_range, new_range = length_range(prompt_len, ratio), length_range(max_tokens, ratio)
    while True:
        n = rng.randint(*prompt_range)
        prompt = [1] + [rng.randrange(100, vocab) for _ in range(n - 1)]
        yield prompt, rng.randint(*new_range)


# ---- in-process -----------------------------------------------------------------------------------------------------
def run_worker(args, model_ref: str) -> dict:
    """The in-process Scheduler's tokens/s on the workload (this runs in the worker process)."""
    import engine
    from engine.generation.serving import PREFILL_SHARE

    options = {"weights_dtype": args.weights_dtype} if args.weights_dtype else {}
    model = engine.load_model(model_ref, **options)
    scheduler = engine.Scheduler(model, max_active=args.clients, prefill_share=PREFILL_SHARE)  # as the server's
    source = requests(args.prompt_len, args.max_tokens, args.range_ratio, model.config.vocab_size)

    def submit():
        prompt, max_tokens = next(source)
        scheduler.submit(prompt, max_new_tokens=max_tokens, ignore_eos=True, temperature=0.0)

    for _ in range(args.clients):
        submit()
    counted, started, end = 0, None, None
    t0 = time.perf_counter()
    while True:
        stepped = scheduler.step()
        now = time.perf_counter()
        for request in stepped:
            if started is not None:  # tokens of the steps that ended inside (started, end]
                counted += len(request.events)
            request.events.clear()
            if request.finished:
                submit()
        if started is None and now - t0 >= args.warmup:
            started, end = now, now + args.duration
        elif started is not None and now >= end:
            return {"tok_s": counted / (now - started), "seconds": now - started, "tokens": counted}


def in_process(args, model_ref: str) -> dict:
    """Run the worker in its own process (its own threads and memory) -> its JSON result."""
    cmd = [sys.executable, "-m", "bench.serve", "--worker", "--model", model_ref, "--clients", str(args.clients),
           "--duration", str(args.duration), "--warmup", str(args.warmup), "--prompt-len", str(args.prompt_len),
           "--max-tokens", str(args.max_tokens), "--range-ratio", str(args.range_ratio)]
    if args.weights_dtype:
        cmd += ["--weights-dtype", args.weights_dtype]
    p = subprocess.run(cmd, cwd=REPO, env=thread_env(args.threads), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench.serve: the in-process worker failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- the server -----------------------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (Linux /proc), None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Server:
    """`tinyllama serve` on a free port of 127.0.0.1, output in a log file."""

    def __init__(self, args, model_ref: str, *flags: str, max_active: int | None = None):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-serve-", suffix=".log", delete=False)
        active = max_active or args.clients
        cmd = [sys.executable, "-m", "engine", "serve", "--model", model_ref, "--port", "0", "--max-active",
               str(active), "--max-queue", str(4 * active), "--log-level", "warning",
               "--shutdown-timeout", "0", *flags]
        if args.weights_dtype:
            cmd += ["--weights-dtype", args.weights_dtype]
        self.process = subprocess.Popen(cmd, cwd=REPO, env=thread_env(args.threads), stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self.url = self.wait_ready()

    def text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 1800) -> str:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"bench.serve: the server exited ({self.process.returncode}):\n{self.text()[-3000:]}")
            found = re.search(r"listening on (http://\S+?:\d+)", self.text())
            if found:
                try:
                    if httpx.get(found.group(1) + "/health", timeout=5).status_code == 200:
                        return found.group(1)
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise SystemExit("bench.serve: the server did not become ready")

    def stop(self) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
        os.unlink(self.log.name)
        return self.process.returncode


async def one_request(client, url: str, request: tuple[list[int], int], window: list[float], stats: dict,
                      deadline: float) -> None:
    """Stream one completion; add the tokens generated inside the window, the TTFT (where the first token came inside the
    window, whether or not the request completes before it closes), or an error, to stats."""
    prompt, max_tokens = request
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    sent = time.perf_counter()
    seen, first, done = 0, None, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                stats["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                tokens = chunk["usage"]["completion_tokens"]
                if tokens > seen:
                    if first is None:
                        first = now
                        if window[0] <= now <= window[1]:  # a first token inside the window: its TTFT counts
                            stats["ttft"].append(first - sent)
                    if window[0] <= now <= window[1]:
                        stats["tokens"] += tokens - seen
                    seen = tokens
                if now >= deadline:
                    return  # the round is over: leave (the server cancels the rest)
    except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop on them
        stats["errors"].append(f"{type(e).__name__}: {e}")
        return
    if not done or seen != max_tokens:
        stats["errors"].append(f"stream ended after {seen}/{max_tokens} tokens without [DONE]")
        return
    stats["completed"] += 1


async def drive(url: str, args, source, duration: float, warmup: float) -> dict:
    """`clients` closed-loop streaming clients for warmup + duration seconds -> the round's figures."""
    import httpx

    now = time.perf_counter()
    window = [now + warmup, now + warmup + duration]
    stats = {"tokens": 0, "ttft": [], "completed": 0, "errors": []}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as client:
        async def loop():
            while time.perf_counter() < window[1]:
                await one_request(client, url, next(source), window, stats, window[1])

        await asyncio.gather(*(loop() for _ in range(args.clients)))
    ttft = sorted(stats["ttft"])

    def pct(q):
        return ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else None

    return {"tok_s": stats["tokens"] / duration, "tokens": stats["tokens"], "completed": stats["completed"],
            "ttft_p50_s": pct(0.5), "ttft_p95_s": pct(0.95), "errors": len(stats["errors"]),
            "error_samples": stats["errors"][:5]}


def wait_idle(url: str, timeout: float = 120) -> None:
    """Until the server's running and waiting counts are 0 (the last round's cut streams are cancelled)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
        if all(families[n].samples[0].value == 0 for n in ("tinyllama_requests_running", "tinyllama_requests_waiting")):
            return
        time.sleep(0.1)


# ---- the report -----------------------------------------------------------------------------------------------------
def fmt(value, unit="", scale=1.0, digits=1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{unit}"


def report(results: dict) -> str:
    base = results["summary"]["in_process_tok_s"]
    cfg = results["settings"]
    prompt_lens = "%d-%d" % length_range(cfg["prompt_len"], cfg["range_ratio"])
    new_lens = "%d-%d" % length_range(cfg["max_tokens"], cfg["range_ratio"])
    lines = [f"model: {results['model']}  clients: {cfg['clients']}  prompt: {prompt_lens}  new tokens: {new_lens}  "
             f"threads: {cfg['threads']}  window: {cfg['warmup']:g} s warm-up + {cfg['duration']:g} s",
             f"in-process Scheduler (batch {cfg['clients']}): {base:.1f} tok/s (the mean of "
             f"{' before and '.join(format(r['tok_s'], '.1f') for r in results['in_process'])} after the server)",
             f"server RSS at start: {fmt(results['rss_start_bytes'], ' MB', 1e-6, 0)}",
             "round  tok/s   of in-process  TTFT p50  TTFT p95  completed  errors  RSS after"]
    for i, r in enumerate(results["rounds"], 1):
        lines.append(f"{i:>5}  {r['tok_s']:6.1f}  {100 * r['tok_s'] / base:12.0f}%  "
                     f"{fmt(r['ttft_p50_s'], ' s', 1, 3):>8}  {fmt(r['ttft_p95_s'], ' s', 1, 3):>8}  "
                     f"{r['completed']:>9}  {r['errors']:>6}  {fmt(r['rss_after_bytes'], ' MB', 1e-6, 0):>9}")
    s = results["summary"]
    lines.append(f"server / in-process: {100 * s['ratio']:.0f}% (mean of rounds; goal >= 85%), errors: {s['errors']}, "
                 f"RSS after the last round vs the first: {fmt(s['rss_growth'], '%', 100, 1)} (goal within 5%)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args, args.model)))
        return 0
    out = Path(args.out or REPO / "bench" / "out" / time.strftime("serve-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    if args.url is not None:
        from bench.serve_conversations import run_against_url

        return run_against_url(args, out)
    model_ref = served_model(args)
    if args.conversations is not None:
        from bench.serve_conversations import run_conversations

        return run_conversations(args, model_ref, out, Server)
    settings = {k: getattr(args, k) for k in ("clients", "duration", "rounds", "prompt_len", "max_tokens",
                                              "range_ratio", "warmup", "threads", "weights_dtype", "quick")}

    def baseline(when: str) -> dict:
        print(f"in-process Scheduler ({when} the server), {args.clients} sequences, {args.warmup:g} + "
              f"{args.duration:g} s ...", flush=True)
        result = in_process(args, model_ref)
        print(f"  {result['tok_s']:.1f} tok/s", flush=True)
        return result

    # The in-process figure is measured before and after the server's rounds and averaged: this machine's speed
    # drifts by several percent over minutes, and a baseline on one side would count that drift as the server's.
    results = {"model": model_ref, "settings": settings, "in_process": [baseline("before")], "rounds": []}
    server = Server(args, model_ref)
    try:
        results["rss_start_bytes"] = rss_bytes(server.process.pid)
        source = requests(args.prompt_len, args.max_tokens, args.range_ratio)
        for i in range(args.rounds):
            print(f"server round {i + 1}/{args.rounds}: {args.clients} streaming clients, {args.warmup:g} + "
                  f"{args.duration:g} s ...", flush=True)
            r = asyncio.run(drive(server.url, args, source, args.duration, args.warmup))
            wait_idle(server.url)
            r["rss_after_bytes"] = rss_bytes(server.process.pid)
            results["rounds"].append(r)
            print(f"  {r['tok_s']:.1f} tok/s, {r['errors']} errors", flush=True)
    finally:
        results["server_exit_status"] = server.stop()
    results["in_process"].append(baseline("after"))
    base = statistics.mean(r["tok_s"] for r in results["in_process"])
    rounds = results["rounds"]
    rss = [r["rss_after_bytes"] for r in rounds]
    results["summary"] = {
        "in_process_tok_s": base,
        "ratio": statistics.mean(r["tok_s"] for r in rounds) / base,
        "errors": sum(r["errors"] for r in rounds),
        "rss_growth": (rss[-1] / rss[0] - 1) if None not in rss else None,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"results: {out / 'results.json'}")
    return 0 if results["summary"]["errors"] == 0 and results["server_exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
