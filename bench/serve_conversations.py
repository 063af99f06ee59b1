"""`python -m bench.serve --conversations C --turns T`: multi-turn chat load, prefix cache on and off (see bench.serve).

Each conversation is seeded text (a system prompt, then one user message per turn, words drawn from WORDS); every
turn re-sends the history and streams the reply through /v1/chat/completions with include_usage. The cache-on
server runs first, then the cache-off one, on the same conversations; the report compares them turn by turn.
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from pathlib import Path

WORDS = ("the bread oven flour water salt yeast dough morning baker shop customer price loaf crust crumb rye wheat "
         "butter sugar honey cake tart pie apple cherry lemon cream milk egg knife table window street market town "
         "river bridge winter summer rain sun wind cold warm early late open close ask answer tell show keep find "
         "give bring make take small large round long short soft hard fresh old new good quiet busy slow quick "
         "always never often today tomorrow yesterday because although while before after since until every").split()


def conversation(seed: int, turns: int, system_words: int, user_words: int) -> tuple[str, list[str]]:
    """A conversation's system prompt and its `turns` user messages (seeded)."""
    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    return f"Conversation {seed}. " + text(system_words), [text(user_words) + " What do you think?"
                                                            for _ in range(turns)]


def transcript(messages: list[dict]) -> str:
    """A conversation as one completion prompt (for a model without a chat template): the system text, then
    'User: ...' / 'Assistant: ...' lines, ending with 'Assistant:' for the reply to come."""
    lines = [m["content"] for m in messages if m["role"] == "system"]
    for m in messages:
        if m["role"] != "system":
            lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}")
    return "\n".join(lines) + "\nAssistant:"


async def chat_turn(client, url: str, messages: list[dict], reply_tokens: int, api: str = "chat") -> dict:
    """One streamed turn -> {ttft_s, reply, prompt_tokens, cached_tokens, completion_tokens, replica, error}; the time
    to first token is to the first chunk that counts a generated token (vLLM's continuous_usage_stats), whether or not
    that token has text yet. api "completions": the turn goes to /v1/completions as one transcript prompt.
    `replica`: the x-tinyllama-replica header (which replica of a cluster answered; None from a single server)."""
    body = {"max_tokens": reply_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if api == "chat":
        body["messages"], path = messages, "/v1/chat/completions"
    else:
        body["prompt"], path = transcript(messages), "/v1/completions"
    sent = time.perf_counter()
    first, reply, usage, replica = None, [], None, None
    try:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            replica = r.headers.get("x-tinyllama-replica")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": f"stream error: {chunk['error'].get('message')}"}
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    if first is None and usage["completion_tokens"] > 0:  # the first token, even one with no text yet
                        first = time.perf_counter()
                for choice in chunk["choices"]:
                    text = choice["delta"].get("content") if api == "chat" else choice.get("text")
                    if text:
                        reply.append(text)
    except Exception as e:  # noqa: BLE001 - a benchmark counts failures
        return {"error": f"{type(e).__name__}: {e}"}
    if usage is None or first is None:
        return {"error": "the stream ended without tokens or usage"}
    return {"ttft_s": first - sent, "reply": "".join(reply), "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "completion_tokens": usage["completion_tokens"], "replica": replica, "error": None}


async def drive_conversations(url: str, args) -> dict:
    """All conversations at once, each turn after the previous reply -> per-conversation turns and the wall time."""
    import httpx

    async def one(seed: int) -> list[dict]:
        system, users = conversation(seed, args.turns, args.system_words, args.user_words)
        messages = [{"role": "system", "content": system}]
        turns = []
        key = getattr(args, "api_key", None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30), headers=headers) as client:
            for user in users:
                messages.append({"role": "user", "content": user})
                turn = await chat_turn(client, url, messages, args.reply_tokens, getattr(args, "api", "chat"))
                turns.append(turn)
                if turn["error"]:
                    break
                messages.append({"role": "assistant", "content": turn.pop("reply")})
        return turns

    started = time.perf_counter()
    conversations = await asyncio.gather(*(one(seed) for seed in range(args.conversations)))
    return {"seconds": time.perf_counter() - started, "conversations": conversations}


def counters(url: str) -> dict:
    """The server's prompt-token and prefix-cache figures from /metrics (a cluster's: summed over its replicas), and a
    cluster router's decisions ('router_<decision>')."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in ("tinyllama_prompt_tokens_prefilled_total", "tinyllama_prompt_tokens_cached_total",
                               "tinyllama_prefix_cache_bytes", "tinyllama_prefix_cache_evictions_total"):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
            elif sample.name == "tinyllama_router_decisions_total":
                out["router_" + sample.labels["decision"]] = sample.value
    return out


def n_choices_cost(url: str, args, n: int = 4) -> dict:
    """One request with n choices on a prompt no earlier request shares -> its usage and the prefilled-token
    counter's growth (one prefill: the prompt's tokens once)."""
    import httpx

    system, users = conversation(10_000, 1, args.system_words, args.user_words)
    before = counters(url)
    r = httpx.post(url + "/v1/chat/completions", timeout=3600,
                   json={"messages": [{"role": "system", "content": system}, {"role": "user", "content": users[0]}],
                         "n": n, "max_tokens": 8, "temperature": 1.0, "seed": 1})
    r.raise_for_status()
    after = counters(url)
    body = r.json()
    return {"n": n, "choices": len(body["choices"]), "prompt_tokens": body["usage"]["prompt_tokens"],
            "completion_tokens": body["usage"]["completion_tokens"],
            "prefilled_tokens": after["tinyllama_prompt_tokens_prefilled_total"]
            - before["tinyllama_prompt_tokens_prefilled_total"]}


def summarize(run: dict, turns: int) -> dict:
    """Per-turn means over conversations and the aggregate tokens/s of one server's run; `cached_share`: the fraction
    of turns 2..T that reported cached_tokens > 0; `cached_token_share`: the fraction of their prompt tokens that
    came from a prefix cache; `replica_switches`: turns 2..T answered by another replica than
    the turn before (a cluster; 0 from a single server)."""
    per_turn = []
    for t in range(turns):
        done = [c[t] for c in run["conversations"] if len(c) > t and not c[t]["error"]]
        per_turn.append({"turn": t + 1, "ttft_s": statistics.mean(d["ttft_s"] for d in done) if done else None,
                         "prompt_tokens": statistics.mean(d["prompt_tokens"] for d in done) if done else None,
                         "cached_tokens": statistics.mean(d["cached_tokens"] for d in done) if done else None,
                         "cached_share": sum(d["cached_tokens"] > 0 for d in done) / len(done) if done else None})
    later = [d for c in run["conversations"] for d in c[1:] if not d["error"]]
    switches = sum(1 for c in run["conversations"] for a, b in zip(c, c[1:])
                   if not a["error"] and not b["error"] and a.get("replica") != b.get("replica"))
    tokens = sum(d["completion_tokens"] for c in run["conversations"] for d in c if not d["error"])
    errors = [d["error"] for c in run["conversations"] for d in c if d["error"]]
    return {"per_turn": per_turn, "tokens": tokens, "tok_s": tokens / run["seconds"], "seconds": run["seconds"],
            "cached_share": sum(d["cached_tokens"] > 0 for d in later) / len(later) if later else None,
            "cached_token_share": (sum(d["cached_tokens"] for d in later) / sum(d["prompt_tokens"] for d in later)
                                   if later else None),
            "later_ttft_s": statistics.mean(d["ttft_s"] for d in later) if later else None,
            "replica_switches": switches,
            "replicas": sorted({d["replica"] for c in run["conversations"] for d in c if d.get("replica")}),
            "errors": len(errors), "error_samples": errors[:5]}


def report(results: dict) -> str:
    on, off = results["cache_on"], results["cache_off"]
    cfg = results["settings"]
    lines = [f"model: {results['model']}  conversations: {cfg['conversations']}  turns: {cfg['turns']}  "
             f"reply: {cfg['reply_tokens']} tokens  threads: {cfg['threads']}",
             "turn  prompt  cached   TTFT on  TTFT off  on/off"]
    for a, b in zip(on["per_turn"], off["per_turn"]):
        ratio = a["ttft_s"] / b["ttft_s"] if a["ttft_s"] and b["ttft_s"] else None
        lines.append(f"{a['turn']:>4}  {a['prompt_tokens'] or 0:6.0f}  {a['cached_tokens'] or 0:6.0f}  "
                     f"{a['ttft_s'] or 0:7.2f} s  {b['ttft_s'] or 0:6.2f} s  "
                     f"{'-' if ratio is None else format(100 * ratio, '.0f') + '%':>6}")
    s = results["summary"]
    lines += [f"aggregate: {on['tok_s']:.1f} tok/s with the cache, {off['tok_s']:.1f} without "
              f"({s['tok_s_ratio']:.2f}x; goal >= 2x); wall {on['seconds']:.0f} s vs {off['seconds']:.0f} s",
              f"last turn TTFT: {100 * s['last_turn_ttft_ratio']:.0f}% of cache-off (goal <= 15%); median over turns "
              f"2-{cfg['turns']}: {100 * s['median_ttft_ratio']:.0f}% (goal <= 25%)",
              f"prompt tokens prefilled: {on['counters']['tinyllama_prompt_tokens_prefilled_total']:.0f} with the "
              f"cache ({on['counters']['tinyllama_prompt_tokens_cached_total']:.0f} from it), "
              f"{off['counters']['tinyllama_prompt_tokens_prefilled_total']:.0f} without; errors {s['errors']}"]
    n = results.get("n_choices")
    if n:
        lines.append(f"n={n['n']}: {n['choices']} choices, prompt {n['prompt_tokens']} tokens, prefilled-token "
                     f"counter +{n['prefilled_tokens']:.0f} (one prefill)")
    return "\n".join(lines)


def run_conversations(args, model_ref: str, out: Path, server_class) -> int:
    """Both servers in turn on the same conversations -> exit status (0 without errors); results.json in `out`."""
    settings = {k: getattr(args, k) for k in ("conversations", "turns", "reply_tokens", "system_words",
                                              "user_words", "threads", "weights_dtype", "quick")}
    results = {"model": model_ref, "settings": settings}
    for name, flags in (("cache_on", ()), ("cache_off", ("--no-prefix-cache",))):
        print(f"{name}: {args.conversations} conversations x {args.turns} turns ...", flush=True)
        server = server_class(args, model_ref, *flags, max_active=max(args.conversations, 4))
        summary: dict = {}
        try:
            run = asyncio.run(drive_conversations(server.url, args))
            summary = summarize(run, args.turns)
            summary["counters"] = counters(server.url)
            if name == "cache_on":
                results["n_choices"] = n_choices_cost(server.url, args)
        finally:
            summary["server_exit_status"] = server.stop()
        results[name] = summary
        print(f"  {summary['tok_s']:.1f} tok/s over {summary['seconds']:.0f} s, {summary['errors']} errors", flush=True)
    on, off = results["cache_on"]["per_turn"], results["cache_off"]["per_turn"]
    ratios = [a["ttft_s"] / b["ttft_s"] for a, b in zip(on, off) if a["ttft_s"] and b["ttft_s"]]
    results["summary"] = {
        "last_turn_ttft_ratio": ratios[-1] if ratios else None,
        "median_ttft_ratio": statistics.median(ratios[1:]) if len(ratios) > 1 else None,
        "tok_s_ratio": results["cache_on"]["tok_s"] / results["cache_off"]["tok_s"],
        "errors": results["cache_on"]["errors"] + results["cache_off"]["errors"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"results: {out / 'results.json'}")
    ok = results["summary"]["errors"] == 0 and all(results[k]["server_exit_status"] == 0
                                                   for k in ("cache_on", "cache_off"))
    return 0 if ok else 1


def run_against_url(args, out: Path) -> int:
    """`--url`: the conversations against a server or cluster already running -> exit status (0 without errors);
    results.json in `out`."""
    settings = {k: getattr(args, k) for k in ("conversations", "turns", "reply_tokens", "system_words",
                                              "user_words", "api")}
    print(f"{args.url}: {args.conversations} conversations x {args.turns} turns ({args.api}) ...", flush=True)
    before = counters(args.url)
    summary = summarize(asyncio.run(drive_conversations(args.url, args)), args.turns)
    after = counters(args.url)
    summary["counters"] = {k: after[k] - before.get(k, 0.0) for k in after if not k.endswith("_bytes")}
    results = {"url": args.url, "settings": settings, "run": summary}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(url_report(results))
    print(f"results: {out / 'results.json'}")
    return 0 if summary["errors"] == 0 else 1


def url_report(results: dict) -> str:
    """The per-turn table and the totals of a --url run."""
    run, cfg = results["run"], results["settings"]
    lines = [f"{results['url']}  conversations: {cfg['conversations']}  turns: {cfg['turns']}  "
             f"reply: {cfg['reply_tokens']} tokens  api: {cfg['api']}",
             "turn  prompt  cached  cached>0     TTFT"]
    for t in run["per_turn"]:
        lines.append(f"{t['turn']:>4}  {t['prompt_tokens'] or 0:6.0f}  {t['cached_tokens'] or 0:6.0f}  "
                     f"{100 * (t['cached_share'] or 0):7.0f}%  {t['ttft_s'] or 0:6.2f} s")
    decisions = {k[7:]: int(v) for k, v in run["counters"].items() if k.startswith("router_")}
    share = run["cached_share"]
    tokens = run["cached_token_share"]
    lines += [f"turns 2-{cfg['turns']} with cached_tokens > 0: {'-' if share is None else format(100 * share, '.0f')}%"
              f" (their prompt tokens from a cache: {'-' if tokens is None else format(100 * tokens, '.0f')}%)"
              f"; mean TTFT {run['later_ttft_s'] or 0:.2f} s; replica switches: {run['replica_switches']} "
              f"(replicas seen: {len(run['replicas'])})",
              f"aggregate: {run['tok_s']:.1f} tok/s over {run['seconds']:.0f} s; errors {run['errors']}"
              + (f"; router decisions {decisions}" if decisions else "")]
    return "\n".join(lines)
