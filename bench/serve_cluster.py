"""`tinyllama serve --replicas N` under the multi-turn workload: 1 and 2 replicas, and prefix-affinity routing against
Ray Serve's default power of two choices, on the same seeded conversations.

    python -m bench.serve_cluster --model REF [--configs 1:prefix,2:prefix,2:pow2] [--conversations 8] [--turns 6]
                                  [--reply-tokens 32] [--system-words 60] [--user-words 20] [--api chat|completions]
                                  [--replica-threads 1] [--out DIR]

Each configuration is a cluster of its own (a local Ray instance started by `tinyllama serve`, stopped before the
next starts), driven by bench.serve's --url mode (bench.serve_conversations): C conversations at once, each turn
re-sending the history. Per configuration: aggregate tokens/s, the mean time to first token of turns 2..T, the share
of turns 2..T whose prompt came partly from a replica's prefix cache (cached_tokens > 0: the turn reached a replica
holding some of its history) and the share of their prompt tokens that did, how often a conversation changed
replica, the router's decisions, the errors, and the CPU time each kind of process spent per 1,000 generated tokens
(Ray Serve's proxy and the ingress relay every token: their cost is the cluster's overhead, whatever the model).
results.json under --out. On a shared machine the tokens/s and TTFT move with the load; the cached shares and the
CPU time per token much less.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.serve import REPO, Server
from bench.serve_conversations import counters, drive_conversations, summarize

DEFAULT_CONFIGS = "1:prefix,2:prefix,2:pow2"
ROLE_MARKS = (("proxy", "ProxyActor"), ("ingress", ":Ingress"), ("replicas", ":ModelReplica"),
              ("controller", "ServeController"))
ROLES = ("proxy", "ingress", "replicas", "controller", "ray", "cli")
STOP_TIMEOUT = 300  # seconds a cluster gets to drain and stop Ray


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local folder or Hub repo id")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated REPLICAS:ROUTER (router prefix or pow2; default %(default)s)")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--system-words", type=int, default=60)
    p.add_argument("--user-words", type=int, default=20)
    p.add_argument("--api", choices=("chat", "completions"), default="chat",
                   help="chat turns, or the conversation as one completion prompt (a model without a chat template)")
    p.add_argument("--replica-threads", type=int, default=1)
    p.add_argument("--weights-dtype", help="passed to `tinyllama serve --weights-dtype`")
    p.add_argument("--out", help="folder for results.json (default bench/out/serve-cluster-<timestamp>)")
    args = p.parse_args(argv)
    try:
        args.configs = [(int(n), router) for n, router in (c.split(":") for c in args.configs.split(","))]
    except ValueError:
        p.error(f"--configs: REPLICAS:ROUTER,... (e.g. {DEFAULT_CONFIGS}), got {args.configs!r}")
    for n, router in args.configs:
        if n < 1 or router not in ("prefix", "pow2"):
            p.error(f"--configs: replicas >= 1 and router prefix or pow2, got {n}:{router}")
    if min(args.conversations, args.turns, args.reply_tokens, args.replica_threads) < 1:
        p.error("--conversations, --turns, --reply-tokens and --replica-threads must be >= 1")
    return args


class ClusterServer(Server):
    """`tinyllama serve --replicas N` on a free port; its process tree (Ray's processes) is recorded while it runs and
    any member still alive after it stopped is ended by its id."""

    def __init__(self, args, replicas: int, router: str):
        self.threads = args.replica_threads
        flags = ("--replicas", str(replicas), "--router", router, "--replica-threads", str(args.replica_threads))
        self.tree = []
        try:
            super().__init__(args, args.model, *flags, max_active=max(args.conversations, 4))
        except BaseException:  # Ctrl-C (or a failure) while the cluster starts: stop it, Ray's processes included
            if getattr(self, "process", None) is not None:
                self.stop()
            raise
        self.tree = self.descendants()

    def descendants(self) -> list:
        import psutil

        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of the server's processes, by role: proxy (Ray Serve's HTTP proxy),
        ingress, replicas, controller, ray (GCS, raylet, agents) and cli (the `tinyllama serve` process)."""
        import psutil

        self.tree += [p for p in self.descendants() if p not in self.tree]
        out = dict.fromkeys(ROLES, 0.0)
        for p in [psutil.Process(self.process.pid)] + self.tree:
            try:
                title = " ".join(p.cmdline())
                t = p.cpu_times()
            except psutil.Error:
                continue
            role = next((r for r, mark in ROLE_MARKS if mark in title), "ray")
            out["cli" if p.pid == self.process.pid else role] += t.user + t.system
        return out

    def stop(self) -> int:
        self.tree += [p for p in self.descendants() if p not in self.tree]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for child in self.tree:  # Ray's processes end with the server; any left are ended here, by their id
            try:
                if child.is_running():
                    child.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        return self.process.returncode


def run_config(args, replicas: int, router: str) -> dict:
    """One cluster: start it, run the conversations, stop it -> the run's summary."""
    print(f"{replicas} replica(s), router {router}: starting ...", flush=True)
    args.threads = args.replica_threads  # bench.serve.Server's environment (the CLI process's own threads)
    server = ClusterServer(args, replicas, router)
    try:
        before, cpu = counters(server.url), server.cpu_seconds()
        summary = summarize(asyncio.run(drive_conversations(server.url, args)), args.turns)
        after, cpu_after = counters(server.url), server.cpu_seconds()
        summary["counters"] = {k: after[k] - before.get(k, 0.0) for k in after if not k.endswith("_bytes")}
        summary["cpu_s_per_ktok"] = {role: 1000 * (cpu_after[role] - cpu[role]) / max(summary["tokens"], 1)
                                     for role in ROLES}
    finally:
        summary_exit = server.stop()
    summary.update(replicas=replicas, router=router, server_exit_status=summary_exit)
    share = summary["cached_share"]
    print(f"  {summary['tok_s']:.1f} tok/s, turns 2-{args.turns} cached: "
          f"{'-' if share is None else format(100 * share, '.0f') + '%'}, errors {summary['errors']}", flush=True)
    return summary


def report(results: dict) -> str:
    """The comparison table."""
    cfg = results["settings"]
    lines = [f"model: {results['model']}  conversations: {cfg['conversations']}  turns: {cfg['turns']}  reply: "
             f"{cfg['reply_tokens']} tokens  api: {cfg['api']}  threads per replica: {cfg['replica_threads']}",
             f"replicas  router   tok/s  TTFT 2-{cfg['turns']}  cached>0 2-{cfg['turns']}  cached tokens  "
             f"switches  decisions (affinity/load/new)  errors"]
    for r in results["runs"]:
        c = r["counters"]
        decisions = "/".join(str(int(c.get(f"router_{k}", 0))) for k in ("affinity", "load", "new")) \
            if r["router"] == "prefix" else "-"
        share = "-" if r["cached_share"] is None else f"{100 * r['cached_share']:.0f}%"
        tokens = "-" if r["cached_token_share"] is None else f"{100 * r['cached_token_share']:.0f}%"
        lines.append(f"{r['replicas']:>8}  {r['router']:<6} {r['tok_s']:6.1f}  {r['later_ttft_s'] or 0:7.2f} s  "
                     f"{share:>13}  {tokens:>13}  {r['replica_switches']:>8}  {decisions:>29}  {r['errors']:>6}")
    lines.append("CPU seconds per 1,000 generated tokens, by process (user + system; the relay's cost is proxy + "
                 "ingress):")
    for r in results["runs"]:
        cost = r["cpu_s_per_ktok"]
        lines.append(f"  {r['replicas']} x {r['router']:<6} " + "  ".join(f"{k} {cost[k]:.2f}" for k in ROLES))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out or REPO / "bench" / "out" / time.strftime("serve-cluster-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("conversations", "turns", "reply_tokens", "system_words", "user_words",
                                              "api", "replica_threads", "weights_dtype")}
    results = {"model": args.model, "settings": settings, "runs": []}
    for replicas, router in args.configs:
        results["runs"].append(run_config(args, replicas, router))
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"results: {out / 'results.json'}")
    ok = all(r["errors"] == 0 and r["server_exit_status"] == 0 for r in results["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
