"""The real `tinyllama serve` in a subprocess on 127.0.0.1 (a free port picked by the server: --port 0), for tests."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.conftest import REPO

URL_LINE = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


class ServerProcess:
    """`python -m engine serve --port 0 ...` with its output in a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, *args: str, env: dict | None = None, preamble: str = ""):
        """`preamble`: Python run in the server's process before it starts (a test plants a fault with it)."""
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="tinyllama-serve-", suffix=".log", delete=False)
        command = ["-m", "engine"] if not preamble else [
            "-c", preamble + "\nimport runpy\nrunpy.run_module('engine', run_name='__main__', alter_sys=True)"]
        self.process = subprocess.Popen(
            [sys.executable, *command, "serve", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=REPO, stdout=self.log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.url = ""

    @property
    def log(self) -> str:
        """Everything the server printed so far."""
        return Path(self.log_file.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        """Wait for the URL line, then for /health to answer 200; RuntimeError with the log if the server died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log}")
            match = URL_LINE.search(self.log)
            if match:
                self.url = match.group(1)
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"the server was not ready in {timeout} s:\n{self.log}")

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C (SIGINT) -> the exit status."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Stop the server (SIGINT, then SIGKILL if it hangs) and remove its log file."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        os.unlink(self.log_file.name)


def metrics(url: str) -> dict[str, float]:
    """/metrics parsed with prometheus_client's own parser: {'name{label="v"}' or 'name': value} for every sample."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
