"""`tinyllama serve`: the OpenAI-compatible HTTP server (engine.serve) under uvicorn.

The socket is bound first (a port in use is one error line, and --port 0 picks a free one), the model loads while
the server already answers /health with 503, and Ctrl-C (SIGINT) or SIGTERM drains: /health and new requests answer
503 (the listener stays open, so a load balancer sees the 503) while the requests in flight get --shutdown-timeout
seconds to finish; then the rest are cancelled, the listener closes, and the process exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import os
import signal
import socket
import sys

from engine.cli.common import (add_chat_template_option, add_model_options, add_speculation_options, chat_template_of,
                               load, speculation_options)
from engine.errors import EngineError
from engine.inspect.sliced import INSPECTION_MEMORY_LIMIT
from engine.text.chat_templates import NAMED
from engine.generation.serving import DEFAULT_PREFIX_CACHE_MB
from engine.inspect.embeddings import DEFAULT_POOLING, POOLINGS

API_KEY_ENV = "TINYLLAMA_API_KEY"
CANCEL_MARGIN = 2.0  # seconds after the grace period for cancelled requests to send their last chunk


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's options (the model options included)."""
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0: any free port)")
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1/*completions and /v1/inspect/* "
                        f"(default ${API_KEY_ENV}); may be repeated: each key's requests then have a prefix cache "
                        "partition of their own")
    p.add_argument("--max-active", type=int, default=32, metavar="N",
                   help="sequences decoded together in one batch (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests that may wait for a place in the batch; beyond, 503 (default %(default)s)")
    p.add_argument("--served-model-name", metavar="NAME", nargs="+",
                   help="the model's name in the API (default: the --model value); more names are aliases that "
                        "requests may use too (the first is the one answers carry)")
    p.add_argument("--pooling", choices=POOLINGS, default=DEFAULT_POOLING,
                   help="how /v1/embeddings makes one vector of the last hidden state: the mean over the tokens, "
                        "or the last token's (default %(default)s; normalized to unit length either way)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000, or '*') call the API from a browser "
                        "(CORS); may be repeated; none by default")
    p.add_argument("--trace-memory-limit", type=float, default=INSPECTION_MEMORY_LIMIT / 2**20, metavar="MB",
                   help="the most memory one /v1/inspect request may take, its answer included (default "
                        "%(default).0f MB)")
    p.add_argument("--max-inspections", type=int, default=2, metavar="N",
                   help="/v1/inspect requests running at once; beyond, 503 (default %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="S",
                   help="on Ctrl-C or SIGTERM, seconds requests in flight get to finish before they are cancelled; "
                        "meanwhile /health and new requests answer 503 (default %(default)s)")
    p.add_argument("--max-request-mb", type=float, default=8.0, metavar="MB",
                   help="largest request body accepted, in MiB; larger is 413 (default %(default)g)")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a client gets to send a request's headers (from connecting, or from its previous "
                        "response), and then its body (408); beyond, the connection is closed (default %(default)g)")
    add_speculation_options(p)
    add_chat_template_option(p)
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB, metavar="MB",
                   help="memory for the KV of earlier requests' prompts and replies, re-used by requests that start "
                        "the same way (a conversation's history, a shared system prompt); least recently used "
                        "blocks are evicted first (default %(default)s)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole (no prefix cache)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log verbosity (default %(default)s; info logs one line per request)")
    g = p.add_argument_group("cluster (replicas on Ray Serve: pip install '.[cluster]'; see docs/cluster.md)")
    g.add_argument("--replicas", type=int, metavar="N",
                   help="serve N replicas of the model on a local Ray instance (127.0.0.1) behind one URL, each with "
                        "its own serving loop and prefix cache; a conversation stays on the replica holding its "
                        "prefix")
    g.add_argument("--max-replicas", type=int, metavar="M",
                   help="autoscale between --replicas and M replicas on the requests in flight")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="run the replicas on this existing Ray cluster (e.g. 10.0.0.5:6379) instead of a local one")
    g.add_argument("--router", choices=("prefix", "pow2"), default="prefix",
                   help="prefix: prefix-cache affinity with a load override (default); pow2: Ray Serve's default "
                        "power of two choices")
    g.add_argument("--replica-threads", type=int, default=1, metavar="N",
                   help="compute threads of each replica (default %(default)s)")
    g.add_argument("--target-ongoing-requests", type=float, metavar="N",
                   help="with --max-replicas: requests in flight per replica that the autoscaler aims at (default: "
                        "--max-active)")
    g.add_argument("--upscale-delay", type=float, default=5.0, metavar="S",
                   help="with --max-replicas: seconds the load must stay high before a replica is added "
                        "(default %(default)s)")
    g.add_argument("--downscale-delay", type=float, default=60.0, metavar="S",
                   help="with --max-replicas: seconds the load must stay low before a replica is removed (it "
                        "finishes its requests first; default %(default)s)")


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for host:port; EngineError with the reason when it cannot be had."""
    if not 0 <= port <= 65535:
        raise EngineError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise EngineError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise EngineError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def log_config(level: str) -> dict:
    """uvicorn's logging set-up, with the server's own logger ('tinyllama.serve') printing the same way."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["tinyllama.serve"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    config["loggers"]["tinyllama.serve.startup"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"]["engine"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def run_serve(args) -> int:
    """The `serve` subcommand: listen, load the model, serve until Ctrl-C -> exit status (0, or 1 on a user error)."""
    for option, value, low in (("--max-active", args.max_active, 1), ("--max-queue", args.max_queue, 0),
                               ("--max-inspections", args.max_inspections, 1)):
        if value < low:
            raise EngineError(f"{option} must be >= {low}, got {value}")
    if args.prefix_cache_mb < 0:
        raise EngineError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
    if args.shutdown_timeout < 0:
        raise EngineError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    for option, value in (("--max-request-mb", args.max_request_mb), ("--read-timeout", args.read_timeout)):
        if not value > 0:
            raise EngineError(f"{option} must be > 0, got {value}")
    if args.trace_memory_limit <= 0:
        raise EngineError(f"--trace-memory-limit must be > 0, got {args.trace_memory_limit}")
    keys = api_keys_of(args)
    api_key = None if not keys else keys[0] if len(keys) == 1 else tuple(keys)
    speculation = speculation_options(args)
    chat_template_of(args)  # a bad --chat-template fails before the socket opens
    if args.replicas is not None or args.ray_address or args.max_replicas is not None:
        from engine.serve.cluster.local import run_cluster

        return run_cluster(cluster_settings(args), args.host, args.port, args.ray_address)
    sock = listening_socket(args.host, args.port)
    import uvicorn

    from engine.serve import create_app
    from engine.serve.connection import TimedH11Protocol

    names = args.served_model_name or [args.model]
    failure: list[str] = []

    class Server(uvicorn.Server):
        """uvicorn's server, draining before it closes the listener: the app answers 503 to /health and to new
        requests while those in flight finish (or, past --shutdown-timeout, are cancelled and end)."""

        async def shutdown(self, sockets=None):
            app.state.server.begin_shutdown(args.shutdown_timeout)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + args.shutdown_timeout + CANCEL_MARGIN
            while self.server_state.tasks and not self.force_exit and loop.time() < deadline:
                await asyncio.sleep(0.05)
            await super().shutdown(sockets=sockets)

    def on_load_error(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(lambda: load(args), names[0], model_aliases=tuple(names[1:]), pooling=args.pooling,
                     api_key=api_key, max_active=args.max_active,
                     max_queue=args.max_queue, on_load_error=on_load_error, allowed_origins=args.allowed_origin,
                     max_request_bytes=int(args.max_request_mb * 2 ** 20), read_timeout=args.read_timeout,
                     trace_memory_limit=int(args.trace_memory_limit * 2**20), speculation=speculation,
                     prefix_cache_mb=0 if args.no_prefix_cache else args.prefix_cache_mb,
                     max_inspections=args.max_inspections)
    config = uvicorn.Config(app, log_config=log_config(args.log_level), log_level=args.log_level, access_log=False,
                            http=TimedH11Protocol.with_head_timeout(args.read_timeout),
                            timeout_graceful_shutdown=CANCEL_MARGIN, lifespan="on")
    server = Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    # the progress lines show at every --log-level
    print(f"INFO:     loading {args.model} ... (GET /health answers 503 until it is ready)", file=sys.stderr)
    print(f"INFO:     listening on http://{shown}:{port} (the chat page: open http://{shown}:{port}/ in a browser; "
          f"OpenAI API at http://{shown}:{port}/v1; Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    # uvicorn restores the signal handlers it found and then re-raises the signal that stopped it: with these,
    # that re-raise is a no-op, so a Ctrl-C or SIGTERM that shut the server down cleanly exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if failure:
        raise EngineError(failure[0])
    return 0


def api_keys_of(args) -> list[str]:
    """The --api-key values (or $TINYLLAMA_API_KEY's); EngineError for an empty one."""
    keys = args.api_key or ([os.environ[API_KEY_ENV]] if os.environ.get(API_KEY_ENV) else [])
    if any(not key.strip() for key in keys):
        raise EngineError("--api-key is empty")
    return keys


def cluster_settings(args):
    """The `serve` flags as the settings of a cluster (engine.serve.cluster.settings.ClusterSettings); EngineError
    naming the flag for a cluster flag out of range."""
    from engine.serve.cluster.settings import ClusterSettings

    replicas = 1 if args.replicas is None else args.replicas
    for option, value in (("--replicas", replicas), ("--replica-threads", args.replica_threads)):
        if value < 1:
            raise EngineError(f"{option} must be >= 1, got {value}")
    if args.max_replicas is not None and args.max_replicas < replicas:
        raise EngineError(f"--max-replicas must be >= --replicas ({replicas}), got {args.max_replicas}")
    if getattr(args, "gguf_file", None) is not None:
        raise EngineError("--gguf-file: a GGUF file cannot be served as replicas yet (the router tokenizes prompts "
                          "with the checkpoint's tokenizer.json); give --model a checkpoint folder or Hub repo id")
    keys = api_keys_of(args)
    if len(keys) > 1:
        raise EngineError("--api-key: replicas take one key (several keys, each with a prefix cache partition of its "
                          "own, are served by one server: leave out --replicas)")
    template = chat_template_of(args)  # the replicas get the text (or the name): a file need not exist on each node
    settings = ClusterSettings(
        model=args.model, revision=args.revision, backend=args.backend, weights_dtype=args.weights_dtype,
        served_model_name=list(args.served_model_name) if args.served_model_name else None,
        chat_template=None if template is None else (args.chat_template if args.chat_template in NAMED
                                                     else template.text),
        pooling=args.pooling, threads=args.replica_threads, replicas=replicas,
        max_replicas=args.max_replicas, router=args.router, max_active=args.max_active, max_queue=args.max_queue,
        max_request_mb=args.max_request_mb, read_timeout=args.read_timeout,
        trace_memory_mb=args.trace_memory_limit, speculate=args.speculate, draft=args.draft,
        prefix_cache_mb=0 if args.no_prefix_cache else args.prefix_cache_mb, api_key=keys[0] if keys else None,
        allowed_origins=list(args.allowed_origin), shutdown_timeout=args.shutdown_timeout,
        target_ongoing_requests=args.target_ongoing_requests, upscale_delay_s=args.upscale_delay,
        downscale_delay_s=args.downscale_delay)
    settings.validate()
    return settings
