"""`tinyllama serve --replicas N`: the cluster application on a local Ray instance (or on an existing Ray cluster
with --ray-address), until Ctrl-C or SIGTERM.

The local instance is this process's own: started with ray.init on 127.0.0.1 only (the node's address is the
loopback, so Ray's servers listen there), explicit CPUs (replicas x threads), a small object store (requests and
token chunks are small; the model never travels through it) and a private temporary folder, removed at exit; Ray
Serve's HTTP proxy listens on --host/--port. Ctrl-C or SIGTERM drains as the single server does (/health and new
requests answer 503 while the requests in flight get --shutdown-timeout seconds), deletes the application, shuts
Ray down and exits 0. Against an existing cluster only the application is deleted at exit; Ray and its Serve
instance stay as they were.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading

from engine.errors import EngineError
from engine.serve.cluster.settings import APP_NAME, ClusterSettings

OBJECT_STORE_BYTES = 200 * 2 ** 20  # requests, token chunks and metrics texts: a few KB each
INSTALL_HINT = "the cluster needs Ray Serve: pip install 'tinyllama-engine[cluster]' (or '.[cluster]' in a checkout)"
# Ray's single-machine mode (its default on macOS and Windows): the node's address is the loopback, and Ray's servers
# (GCS, raylet, workers, object manager, agents) listen on 127.0.0.1 only, not on every interface.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_USAGE_STATS_ENABLED": "0"}  # no usage report


def free_port(host: str) -> int:
    """A TCP port free on `host` now (Ray Serve's proxy takes a number, not a bound socket)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """EngineError with the reason when host:port cannot be listened on (a port in use, say)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise EngineError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def is_loopback(address: str) -> bool:
    """Whether a Ray address (host:port, or ray://host:port) names this machine's loopback."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def start_local_ray(num_cpus: int, temp_dir: str) -> None:
    """A Ray instance of this process on 127.0.0.1 with `num_cpus` CPUs, its files under `temp_dir`."""
    os.environ.update(LOOPBACK_ENV)  # before Ray is imported (it reads them at import)
    import ray

    ray.init(address="local", num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             _node_ip_address="127.0.0.1", _temp_dir=temp_dir, log_to_driver=False, logging_level=logging.WARNING,
             namespace=APP_NAME)


def deploy(settings: ClusterSettings, host: str, port: int) -> None:
    """Start Ray Serve's proxy on host:port (where it is not running yet) and run the application; returns when every
    replica has loaded its model. EngineError with the replicas' reason when they cannot start."""
    from ray import serve

    from engine.serve.cluster.deployment import build_app

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as error:  # noqa: BLE001 - Ray Serve reports a replica's failure with its traceback
        raise EngineError(deploy_failure(str(error) + "\n" + deployment_messages())) from None


def deployment_messages() -> str:
    """Ray Serve's status messages of this application's deployments (a failed replica's traceback among them)."""
    from ray import serve

    try:
        app = serve.status().applications.get(APP_NAME)
        return "\n".join(d.message for d in app.deployments.values() if d.message) if app else ""
    except Exception:  # noqa: BLE001 - the status is only for the error message
        return ""


def deploy_failure(text: str) -> str:
    """The one line that says why a deployment failed, out of Ray Serve's report (a replica's traceback)."""
    found = re.findall(r"(?:EngineError|CheckpointError|FileNotFoundError|OSError|ValueError): (.+)", text)
    if found:
        return found[-1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the cluster failed to start"


def run_cluster(settings: ClusterSettings, host: str, port: int, ray_address: str | None = None) -> int:
    """Serve `settings` until Ctrl-C or SIGTERM -> exit status 0 (EngineError for a user's error)."""
    settings.validate()
    if port == 0:
        port = free_port(host)
    check_port(host, port)
    if ray_address is None or is_loopback(ray_address):
        os.environ.update(LOOPBACK_ENV)  # before Ray is imported (it reads them at import): see LOOPBACK_ENV
    try:
        import ray  # noqa: F401 - only to say what to install when it is missing
        from ray import serve  # noqa: F401
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    temp_dir = None
    stop = threading.Event()
    try:
        if ray_address:
            print(f"INFO:     connecting to the Ray cluster at {ray_address} ...", file=sys.stderr, flush=True)
            try:
                ray.init(address=ray_address, namespace=APP_NAME, logging_level=logging.WARNING,
                         log_to_driver=False)
            except ConnectionError as e:
                raise EngineError(f"cannot connect to the Ray cluster at {ray_address}: {e} (a cluster with token "
                                  f"authentication needs RAY_AUTH_MODE=token and its token: see Ray's "
                                  f"token-auth docs)") from None
        else:
            cpus = settings.most_replicas * settings.threads
            temp_dir = tempfile.mkdtemp(prefix="tlray-")
            print(f"INFO:     starting a local Ray instance ({cpus} CPUs for up to {settings.most_replicas} replicas "
                  f"x {settings.threads} threads; files under {temp_dir}) ...", file=sys.stderr, flush=True)
            start_local_ray(cpus, temp_dir)
        scale = (f"{settings.replicas}-{settings.max_replicas} replicas (autoscaling)" if settings.autoscaling
                 else f"{settings.replicas} replica{'s' * (settings.replicas > 1)}")
        print(f"INFO:     loading {settings.model} in {scale}, router {settings.router} ...", file=sys.stderr,
              flush=True)
        deploy(settings, host, port)
        shown = f"[{host}]" if ":" in host else host
        print(f"INFO:     listening on http://{shown}:{port} (the chat page: open http://{shown}:{port}/ in a "
              f"browser; OpenAI API at http://{shown}:{port}/v1; cluster metrics at /metrics; Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        if ray_address:
            print("INFO:     (where Ray Serve was already running on that cluster, its own HTTP address applies)",
                  file=sys.stderr, flush=True)
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print(f"INFO:     shutting down: the requests in flight get {settings.shutdown_timeout:g} s to finish "
              f"(/health and new requests answer 503) ...", file=sys.stderr, flush=True)
        drain(settings.shutdown_timeout)
        return 0
    finally:
        shutdown(local=ray_address is None)
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def drain(grace: float) -> None:
    """Have the ingress answer 503 to /health and new requests, and wait up to `grace` s for those in flight."""
    from ray import serve

    try:
        left = serve.get_app_handle(APP_NAME).drain.remote(grace).result(timeout_s=grace + 30)
    except Exception:  # noqa: BLE001 - an ingress that is gone has nothing to drain
        return
    if left:
        print(f"INFO:     {left} request(s) still in flight after {grace:g} s: cancelled", file=sys.stderr,
              flush=True)


def shutdown(local: bool) -> None:
    """Delete the application (local: shut Ray Serve and the local Ray instance down), ignoring what is gone."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.delete(APP_NAME)  # each replica finishes what it still runs, within the shutdown timeout
        if local:
            serve.shutdown()
    except Exception:  # noqa: BLE001 - shutting down what may be half started
        pass
    ray.shutdown()
