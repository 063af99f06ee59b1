"""A GGUF file from a Hugging Face Hub repo (`--gguf-file NAME`, `load_model(repo, gguf_file=NAME)`): downloaded by
huggingface_hub's own hf_hub_download into the standard cache. The Hub is not reachable here, so a stand-in serves
the few routes hf_hub_download and list_repo_files call, on 127.0.0.1 (HF_ENDPOINT points the real client at it)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest

pytest.importorskip("gguf")
import engine  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.gguf_support import write_gguf  # noqa: E402
from weights import CheckpointError  # noqa: E402

REPO_ID = "tiny-org/stories260K-GGUF"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
NAME = "stories260K.Q8_0.gguf"


class StandInHub(BaseHTTPRequestHandler):
    """/{repo}/resolve/{rev}/{file} (HEAD and GET) and /api/models/{repo}/tree/{rev}, for one repo of files."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def log_message(self, *args):  # quiet
        pass

    def _file(self) -> tuple[str | None, bytes | None]:
        path = unquote(urlparse(self.path).path)
        prefix = f"/{REPO_ID}/resolve/"
        if not path.startswith(prefix):
            return None, None
        name = path[len(prefix):].split("/", 1)[1]
        return name, self.files.get(name)

    def _answer_file(self, with_body: bool) -> None:
        name, data = self._file()
        self.requests.append(f"{self.command} {name}")
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if name is not None else "RepoNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer_file(False)

    def do_GET(self):
        path = urlparse(self.path).path
        if path.startswith(f"/api/models/{REPO_ID}/tree/"):
            body = json.dumps([{"type": "file", "path": n, "size": len(d), "oid": "0" * 40}
                               for n, d in self.files.items()]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._answer_file(True)


@pytest.fixture()
def hub(tmp_path, monkeypatch, stories260k):
    """The stand-in serving REPO_ID with NAME and a README, huggingface_hub pointed at it and at an empty cache."""
    StandInHub.files = {NAME: write_gguf(stories260k, tmp_path / NAME, "Q8_0").read_bytes(), "README.md": b"hi"}
    StandInHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
    monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    yield {"endpoint": endpoint, "cache": cache}
    server.shutdown()
    server.server_close()


def test_gguf_file_is_downloaded_into_the_standard_cache(hub):
    model = engine.load_model(REPO_ID, gguf_file=NAME)
    assert model.gguf_path.name == NAME and str(hub["cache"]) in str(model.gguf_path)
    assert f"models--{REPO_ID.replace('/', '--')}" in str(model.gguf_path) and COMMIT in str(model.gguf_path)
    assert model.generate([1], max_new_tokens=5) == engine.load_model(str(model.gguf_path)).generate([1], max_new_tokens=5)
    assert f"GET {NAME}" in StandInHub.requests


def test_a_file_name_not_in_the_repo_names_the_files_there(hub):
    with pytest.raises(CheckpointError) as e:
        engine.load_model(REPO_ID, gguf_file="stories260K.Q5_K_M.gguf")
    message = str(e.value)
    assert "no file 'stories260K.Q5_K_M.gguf'" in message and NAME in message and "README" not in message


def test_cli_gguf_file_flag(hub):
    env = {"HF_ENDPOINT": hub["endpoint"], "HF_HUB_CACHE": str(hub["cache"]), "PATH": "/usr/bin:/bin",
           "TINYLLAMA_QUANT_CACHE": "0"}
    import os

    env = {**os.environ, **env}
    env.pop("HF_HUB_OFFLINE", None)
    ok = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", REPO_ID, "--gguf-file", NAME,
                         "--max-new-tokens", "4", "Once upon a time"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
    bad = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", REPO_ID, "--gguf-file", "nope.gguf",
                          "hi"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no file 'nope.gguf'" in bad.stderr, bad.stderr
