"""The Ray Serve application: an Ingress deployment in front of a ModelReplica deployment.

    HTTP -> Ray Serve's proxy -> Ingress (reads the body, keys the prompt) -> the request router -> a ModelReplica
                                                                              (runs the app of `tinyllama serve`)

This is the shape of Ray Serve LLM (an OpenAI ingress calling LLM server replicas through a deployment handle whose
router picks the replica), with the single server's app in each replica: the router sees the request's routing keys
because the ingress passes them as the call's argument (the HTTP proxy's own routing never sees a body).

- ModelReplica: loads the model in its constructor (Ray Serve sends it nothing until it is loaded), serves each
  forwarded request through engine.serve.app (engine.serve.cluster.forwarding.AppHost), reports unhealthy when its
  model or serving thread is gone (Ray Serve then replaces it), and on removal first lets Ray Serve drain its
  requests (graceful_shutdown_timeout_s = shutdown_timeout), then drains its app (/health 503, the rest cancelled).
- Ingress: engine.serve.cluster.ingress.IngressApp with Ray Serve's handle as `forward`.
- build_app(settings) -> the Application; app_builder(args) is the `import_path` of a `serve run` config file.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from engine.model import load_model
from engine.serve.app import create_app
from engine.serve.cluster.cluster_metrics import ClusterMetrics
from engine.serve.cluster.forwarding import AppHost, ForwardedRequest
from engine.serve.cluster.ingress import CLUSTER_BUSY, REPLICA_FAILED, Failure, IngressApp
from engine.serve.cluster.registry import router_of
from engine.serve.cluster.routing import block_digests, prompt_ids, tokenizer_model
from engine.serve.cluster.settings import ClusterSettings

log = logging.getLogger("tinyllama.cluster")

REPLICA_DEPLOYMENT = "ModelReplica"
INGRESS_DEPLOYMENT = "Ingress"
ROUTER_CLASSES = {"prefix": "engine.serve.cluster.router:PrefixAffinityRouter",
                  "pow2": "engine.serve.cluster.router:PowerOfTwoRouter"}
REPLICA_HEADER = b"x-tinyllama-replica"  # every response names the replica that served it
METRICS_PERIOD_S = 2.0  # how often each replica reports its /metrics to the routers (the cluster view's lag)
INGRESS_MAX_ONGOING = 100_000  # the ingress only relays: it never refuses for load (the replicas' queues do)
DRAIN_POLL_S = 0.5  # how often Ray Serve checks whether a replica being removed has finished its requests


def bind_internal_grpc_to_loopback() -> None:
    """On a node whose IP is the loopback (the local instance of `tinyllama serve --replicas`), bind this replica's
    inter-deployment gRPC server to 127.0.0.1 too: Ray Serve 2.60 binds it to [::]:0, all interfaces, whatever the
    node IP (ray/serve/_private/replica.py, `_on_initialized`), and runs it after the constructor, where this is
    called. Elsewhere (a real cluster), and on a Ray without that hook, nothing changes."""
    try:
        import ray.serve._private.replica as replica_module

        if ray.util.get_node_ip_address() != "127.0.0.1" or not hasattr(replica_module, "add_port_to_grpc_server"):
            return
        original = replica_module.add_port_to_grpc_server
        if getattr(original, "loopback_only", False):
            return

        def add_port(server, address):
            return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

        add_port.loopback_only = True
        replica_module.add_port_to_grpc_server = add_port
    except Exception:  # noqa: BLE001 - an internal of Ray: when it moves, keep Ray's own behaviour
        log.debug("could not bind the replica's gRPC server to the loopback", exc_info=True)


class ModelReplica:
    """One loaded model with its serving loop and prefix cache, serving forwarded HTTP requests through the app."""

    async def __init__(self, settings: dict):
        s = ClusterSettings.from_dict(settings)
        bind_internal_grpc_to_loopback()
        options = s.model_options()
        self.host = AppHost(create_app(lambda: load_model(**options), **s.app_options()))
        await self.host.start()  # the model loads on a thread; Ray Serve routes nothing here until it is loaded
        self.id = serve.get_replica_context().replica_id.unique_id
        self.headers = [(REPLICA_HEADER, self.id.encode())]

    async def handle_http(self, request: ForwardedRequest):
        """Serve one forwarded request: its response's ASGI messages, streamed."""
        async for message in self.host.call(request, self.headers):
            yield message

    def record_routing_stats(self) -> dict:
        """Ray Serve polls this every METRICS_PERIOD_S and hands it to the request routers: this replica's /metrics
        exposition, which the ingress merges into the cluster's /metrics."""
        return {"metrics": self.host.state.metrics.render().decode()}

    async def replica_id(self) -> str:
        """This replica's id (ReplicaID.unique_id: the `replica` label of the cluster's metrics)."""
        return self.id

    async def check_health(self) -> None:
        """Ray Serve's periodic health check: raises when this replica cannot serve (it is then replaced)."""
        problem = self.host.problem()
        if problem is not None:
            raise RuntimeError(problem)

    async def __del__(self):
        # Ray Serve has stopped routing here and drained the ongoing requests (or its grace period ran out):
        # /health and late arrivals answer 503 from now, anything left is cancelled, the serving loop stops.
        await self.host.stop(grace=0.0)


@serve.ingress()
class Ingress:
    """The cluster's HTTP entry (see engine.serve.cluster.ingress): keys each request, forwards it to a replica."""

    async def __init__(self, settings: dict, replicas):
        s = ClusterSettings.from_dict(settings)
        bind_internal_grpc_to_loopback()
        self.replicas = replicas
        self.api_key = s.api_key
        self.tokens = await asyncio.to_thread(tokenizer_model, s.model, s.revision, s.chat_template)
        self.metrics = ClusterMetrics(self._replicas_running, self._decisions)
        self._app = IngressApp(self._forward, self._keys_of, classify, self._replicas_running, self._cluster_metrics,
                              max_body_bytes=int(s.max_request_mb * 2 ** 20),
                              on_failure=lambda code: self.metrics.failures.labels(code).inc())
        self._warm = asyncio.ensure_future(self._start_router())

    def __serve_build_asgi_app__(self):
        return self._app

    async def _start_router(self) -> None:
        """One call through the handle, so that its router exists (and lists the replicas) before any request."""
        try:
            await self.replicas.replica_id.remote()
        except Exception:  # noqa: BLE001 - a replica that failed to start is Ray Serve's to report
            log.debug("the first call to a replica failed", exc_info=True)

    async def drain(self, grace: float) -> int:
        """Stop taking requests (503) and wait up to `grace` s for those in flight -> how many are left."""
        return await self._app.drain(grace)

    def _router(self):
        return router_of(self.replicas.app_name, self.replicas.deployment_name)

    def _replicas_running(self) -> int | None:
        router = self._router()
        return None if router is None else len(router.replica_ids())

    def _decisions(self) -> dict[str, int]:
        router = self._router()
        return {} if router is None else router.decisions()

    def _keys_of(self, path: str, body: bytes, headers: list) -> tuple[int, ...]:
        if self.api_key is not None and not authorized(headers, self.api_key):
            return ()  # the replica answers 401: nothing of the request is worth tokenizing
        ids = prompt_ids(self.tokens, path, body)
        return block_digests(ids) if ids else ()

    async def _forward(self, request: ForwardedRequest):
        stream = self.replicas.options(stream=True).handle_http.remote(request)
        ended = False
        try:
            async for message in stream:
                yield message
            ended = True
        finally:
            if not ended:
                stream.cancel()  # the client went away, or the replica failed: end the call there too

    async def _cluster_metrics(self) -> tuple[bytes, str]:
        router = self._router()
        stats = router.replica_stats() if router is not None else {}
        texts = {replica: s.get("metrics") for replica, s in stats.items()}  # None until its first report
        return self.metrics.render(texts), self.metrics.content_type


def authorized(headers: list, api_key: str) -> bool:
    """Whether ASGI `headers` carry 'Authorization: Bearer <api_key>'."""
    value = next((v for k, v in headers if k.lower() == b"authorization"), b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


def classify(error: BaseException) -> Failure | None:
    """The client's view of a forwarding error (engine.serve.cluster.ingress), None for a bug (a 500)."""
    if isinstance(error, BackPressureError):
        return Failure(503, "the cluster is busy: every replica's queue is full and so is the queue waiting for "
                            "them; retry shortly", CLUSTER_BUSY)
    if isinstance(error, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)):
        return Failure(503, "the replica serving this request failed (it is being replaced); retry the request",
                       REPLICA_FAILED)
    return None


def runtime_env(settings: ClusterSettings) -> dict:
    """Every replica's environment: its thread count, and this copy of the engine first on the import path (a
    worker started by Ray imports the same engine as the process that built the application)."""
    source = str(Path(__file__).resolve().parents[3])  # the folder holding the `engine` package
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {**settings.thread_env(), "PYTHONPATH": path}}


def build_app(settings: ClusterSettings):
    """The Ray Serve Application (bind it with serve.run, or return it from a config file's builder)."""
    settings.validate()
    env = runtime_env(settings)
    scaling = {"num_replicas": settings.replicas}
    if settings.autoscaling:
        scaling = {"autoscaling_config": {
            "min_replicas": settings.replicas, "max_replicas": settings.max_replicas,
            "initial_replicas": settings.replicas,
            "target_ongoing_requests": settings.target_ongoing_requests or settings.max_active,
            "upscale_delay_s": settings.upscale_delay_s, "downscale_delay_s": settings.downscale_delay_s}}
    replica = serve.deployment(ModelReplica).options(
        name=REPLICA_DEPLOYMENT, **scaling,
        max_ongoing_requests=settings.max_active + settings.max_queue,
        max_queued_requests=settings.max_queue,
        ray_actor_options={"num_cpus": settings.threads, "runtime_env": env},
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASSES[settings.router],
            request_router_kwargs={"imbalance": settings.imbalance, "capacity": settings.router_blocks}
            if settings.router == "prefix" else {},
            request_routing_stats_period_s=METRICS_PERIOD_S),
        graceful_shutdown_timeout_s=settings.shutdown_timeout, graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=settings.health_check_timeout_s)
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_DEPLOYMENT, num_replicas=settings.ingress_replicas, max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0, "runtime_env": env},
        graceful_shutdown_timeout_s=settings.shutdown_timeout, graceful_shutdown_wait_loop_s=DRAIN_POLL_S)
    data = settings.to_dict()
    return ingress.bind(data, replica.bind(data))


def app_builder(args: dict):
    """`import_path` of a `serve run` / `serve deploy` config file: its `args:` are ClusterSettings fields."""
    return build_app(ClusterSettings.from_dict(args))
