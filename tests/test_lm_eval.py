"""lm-evaluation-harness against `tinyllama serve`: the real `lm_eval` command with its `local-completions` model runs
three small local tasks (tests/lm_eval_tasks: multiple choice, loglikelihood_rolling, generate_until) on stories260K,
and lm-eval's `hf` backend (transformers) runs them on the same checkpoint at the same time; every document's
log-likelihoods agree to 1e-4, the greedy generations are the same, and so is every metric. Also: lm-eval detects
the server's own tokenizer (/tokenizer_info + /tokenize, its `remote` backend) and it tokenizes as transformers does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend imports it
httpx = pytest.importorskip("httpx")

from tests.serve_support import ServerProcess  # noqa: E402 - needs httpx

TASKS = "tiny_stories_choice,tiny_stories_perplexity,tiny_stories_continue"
NAME = "stories260K"
WINDOW = 512


@pytest.fixture(scope="module")
def server(stories260k):
    s = ServerProcess("--model", str(stories260k), "--served-model-name", NAME,
                      env={"TINYLLAMA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def lm_eval_command(model: str, model_args: str, output: Path, *extra: str) -> list[str]:
    lm_eval = Path(sys.executable).with_name("lm_eval")
    command = [str(lm_eval)] if lm_eval.exists() else [sys.executable, "-m", "lm_eval"]
    return [*command, "--model", model, "--model_args", model_args, "--tasks", TASKS,
            "--include_path", "tests/lm_eval_tasks", "--output_path", str(output), "--log_samples", *extra]


def read_run(output: Path) -> tuple[dict, dict]:
    """lm_eval's output folder -> (results per task, {task: [filtered_resps of each doc, in doc order]})."""
    results = json.loads(next(output.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for path in output.rglob("samples_*.jsonl"):
        docs = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda d: d["doc_id"])
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [d["filtered_resps"] for d in docs]
    return results, samples


def test_lm_eval_local_completions_matches_its_hf_backend(server, stories260k, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    # as a user runs it: token ids from the model's tokenizer, BOS first as transformers adds it, 4 prompts a request
    api = lm_eval_command("local-completions",
                          f"base_url={server.url}/v1/completions,model={NAME},tokenizer={stories260k},"
                          f"tokenizer_backend=huggingface,add_bos_token=True,max_length={WINDOW - 1}",
                          tmp_path / "api", "--batch_size", "4")
    hf = lm_eval_command("hf", f"pretrained={stories260k},dtype=float32,add_bos_token=True", tmp_path / "hf",
                         "--device", "cpu")
    runs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for c in (api, hf)]
    logs = [run.communicate(timeout=900)[0] for run in runs]
    for run, log in zip(runs, logs):
        assert run.returncode == 0, log[-4000:]
    (api_results, api_docs), (hf_results, hf_docs) = read_run(tmp_path / "api"), read_run(tmp_path / "hf")
    assert set(api_docs) == set(hf_docs) == set(TASKS.split(","))

    choices = [[float(ll) for ll, _ in doc] for doc in api_docs["tiny_stories_choice"]]
    expected = [[float(ll) for ll, _ in doc] for doc in hf_docs["tiny_stories_choice"]]
    assert len(choices) == 6 and all(len(doc) == 4 for doc in choices)
    for mine, reference in zip(choices, expected):
        assert mine == pytest.approx(reference, abs=1e-4)
    greedy = [[g for _, g in doc] for doc in api_docs["tiny_stories_choice"]]
    assert greedy == [[g for _, g in doc] for doc in hf_docs["tiny_stories_choice"]]  # is_greedy, from top_logprobs
    rolling = [float(doc[0]) for doc in api_docs["tiny_stories_perplexity"]]
    assert len(rolling) == 4
    assert rolling == pytest.approx([float(doc[0]) for doc in hf_docs["tiny_stories_perplexity"]], abs=1e-4)
    assert api_docs["tiny_stories_continue"] == hf_docs["tiny_stories_continue"]

    for task, metrics in hf_results.items():
        for metric, value in metrics.items():
            if isinstance(value, float) and "stderr" not in metric:
                assert api_results[task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_lm_eval_finds_the_servers_tokenizer(server, stories260k):
    """Without a tokenizer argument lm-eval asks the server (vLLM's /tokenizer_info and /tokenize): the ids are
    transformers' own for the model."""
    transformers = pytest.importorskip("transformers")
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    url = f"{server.url}/v1/completions"
    assert check_remote_tokenizer_support(url)
    remote, reference = RemoteTokenizer(url), transformers.AutoTokenizer.from_pretrained(stories260k)
    for text in ("Once upon a time, there was a little girl.", "Lily said: \"Look!\"\n\nThe end."):
        assert remote.encode(text) == reference(text, add_special_tokens=False).input_ids
    assert (remote.bos_token_id, remote.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    ids = reference("Once upon a time").input_ids
    assert remote.decode(ids) == reference.decode(ids)
