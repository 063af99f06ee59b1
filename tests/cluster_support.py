"""`tinyllama serve --replicas N` in a subprocess for tests: a local Ray instance on 127.0.0.1 started by the server
and stopped with it. Every process of its tree (Ray's GCS, raylet, workers, replicas) is recorded while it runs, so
a test can check that none is left after Ctrl-C, and any that is left is ended by its id."""
from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests.serve_support import ServerProcess

REPLICA_TITLE = "ServeReplica:tinyllama:ModelReplica"  # a replica worker's process title (Ray sets it)
TEMP_LINE = re.compile(r"files under (\S+)\)")
STOP_TIMEOUT = 300  # seconds the server gets to drain, stop Ray Serve and Ray (a loaded 2-core machine is slow)


class ClusterProcess(ServerProcess):
    """The cluster server; `tree`: the processes recorded under it (track() adds the current ones)."""

    def __init__(self, *args: str, replicas: int = 2, env: dict | None = None):
        super().__init__("--replicas", str(replicas), *args, env=env)
        self.tree: list[psutil.Process] = []

    def wait_ready(self, timeout: float = 900) -> "ClusterProcess":
        super().wait_ready(timeout)
        self.track()
        return self

    def track(self) -> None:
        """Record the processes under the server now (new replicas appear after a failure or a scale-up)."""
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                if all(child.pid != p.pid for p in self.tree):
                    self.tree.append(child)
        except psutil.NoSuchProcess:
            pass

    def replicas(self) -> list[psutil.Process]:
        """The replica worker processes running now."""
        self.track()
        out = []
        for p in self.tree:
            try:
                if p.is_running() and REPLICA_TITLE in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    @property
    def temp_dir(self) -> Path | None:
        """The local Ray instance's folder, as the server printed it."""
        match = TEMP_LINE.search(self.log)
        return Path(match.group(1)) if match else None

    def interrupt(self, timeout: float = STOP_TIMEOUT) -> int:
        self.track()
        return super().interrupt(timeout)

    def leftovers(self, wait: float = 30) -> list[psutil.Process]:
        """Recorded processes still alive after the server exited (waiting up to `wait` s for them to go)."""
        deadline = time.monotonic() + wait
        while True:
            alive = []
            for p in self.tree:
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p)
                except psutil.Error:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)

    def stop(self) -> None:
        """Ctrl-C, then SIGKILL if it hangs; every recorded process still alive is then ended by its id."""
        self.track()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for p in self.leftovers(wait=10):
            try:
                p.kill()
            except psutil.Error:
                pass
        super().stop()


def listening_addresses(processes: list[psutil.Process]) -> set[str]:
    """The addresses the given processes listen on (TCP), e.g. {'127.0.0.1'}."""
    found = set()
    for p in processes:
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.add(c.laddr.ip)
        except psutil.Error:
            pass
    return found
