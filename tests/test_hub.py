"""Model references: local folders, and Hub ids resolved through huggingface_hub's cache (the Hub is not reachable
here, so these tests build a real cache layout and run snapshot_download offline against it)."""
from __future__ import annotations

import shutil

import pytest

import engine
from weights import CheckpointError, hub, resolve_model_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch, stories260k):
    """An HF hub cache holding 'tiny-org/stories260K' at COMMIT, and the environment pointed at it, offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--stories260K"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in stories260k.iterdir():
        if f.suffix in (".json", ".safetensors"):
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return cache


def test_local_folder_is_used_as_is(stories260k):
    assert resolve_model_folder(str(stories260k)) == stories260k


def test_hub_id_resolves_from_the_cache_offline(hf_cache):
    folder = resolve_model_folder("tiny-org/stories260K")
    assert folder.name == COMMIT and (folder / "model.safetensors").exists()
    model = engine.load_model("tiny-org/stories260K")
    assert model.generate([1], max_new_tokens=5) == [403, 407, 261, 378, 432]


def test_uncached_hub_id_offline_says_how_to_get_it(hf_cache):
    with pytest.raises(CheckpointError) as info:
        resolve_model_folder("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    msg = str(info.value)
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg and "--model" in msg


def test_download_asks_only_for_the_files_inference_needs(monkeypatch, tmp_path):
    calls = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert resolve_model_folder("TinyLlama/TinyLlama-1.1B-Chat-v1.0", revision="abc") == tmp_path
    assert calls["repo_id"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0" and calls["revision"] == "abc"
    assert "*.safetensors" in calls["allow_patterns"] and "tokenizer.json" in calls["allow_patterns"]
    assert not any(p.endswith(".bin") for p in calls["allow_patterns"])


@pytest.mark.parametrize("ref", ["./missing-model", "/no/such/folder", "a/b/c"])
def test_paths_that_do_not_exist_are_not_sent_to_the_hub(ref):
    assert hub.looks_like_path(ref)
    with pytest.raises(CheckpointError, match="no such model folder"):
        resolve_model_folder(ref)
