"""The installed `tinyllama` console script, run in a subprocess as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

ALWAYS_DRAFT = {"TINYLLAMA_DRAFT_ALWAYS": "1"}  # every speculating step drafts (the acceptance is what is tested)


def tinyllama(*args, stdin: str | None = None, timeout: int = 120,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line of the code under test (`python -m engine` from this checkout), never a PATH lookup; `env`:
    variables set on top of this process's environment."""
    cmd = [sys.executable, "-m", "engine"]
    return subprocess.run(cmd + list(args), input=stdin, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **env} if env else None)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_generate_streams_the_story(stories260k):
    p = tinyllama("generate", "--model", str(stories260k), "--max-new-tokens", "30", "Once upon a time")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(", there was a little girl named Lily")


def test_generate_prompt_from_stdin_with_stop_and_json(stories260k):
    p = tinyllama("generate", "--model", str(stories260k), "--json", "--stop", "Lily", stdin="Once upon a time")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["text"] == ", there was a little girl named "
    assert out["stop_reason"] == "stop_string" and out["prompt_token_ids"] == [1, 403, 407, 261, 378]
    assert out["token_ids"][:3] == [432, 383, 286]
    assert set(out["timings"]) >= {"prompt_tokens_per_s", "generated_tokens_per_s", "time_to_first_token_s"}


def test_generate_sampling_flags_and_verbose(stories260k):
    args = ["generate", "--model", str(stories260k), "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9",
            "--min-p", "0.05", "--repetition-penalty", "1.1", "--seed", "3", "--max-new-tokens", "20", "--verbose",
            "Once upon a time"]
    a, b = tinyllama(*args), tinyllama(*args)
    assert a.returncode == 0 and a.stdout == b.stdout and len(a.stdout) > 10
    assert "generated: 20 tokens" in a.stderr and "stop: max_new_tokens" in a.stderr


def test_generate_chat_template(tiny_chat_model):
    p = tinyllama("generate", "--model", str(tiny_chat_model), "--chat", "--system", "Be brief.", "--json",
                  "--max-new-tokens", "5", "Hi")
    assert p.returncode == 0, p.stderr
    from engine.text.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tiny_chat_model)
    expected = tok.encode("<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n")
    assert json.loads(p.stdout)["prompt_token_ids"] == expected and expected[0] == 1


def test_chat_flag_without_template_is_one_line(stories260k):
    assert "no chat template" in one_line_error(tinyllama("generate", "--model", str(stories260k), "--chat", "Hi"))


def test_bad_flag_exits_2():
    p = tinyllama("generate", "--temperature", "warm", "x")
    assert p.returncode == 2 and "invalid float value" in p.stderr and "Traceback" not in p.stderr


BAD_VALUES = [  # (option, bad value, what the one-line message names)
    ("temperature", "-1", "temperature must be >= 0"), ("temperature", "nan", "temperature must be a finite"),
    ("temperature", "inf", "temperature must be a finite"), ("top-k", "-1", "top_k must be an integer >= 0"),
    ("top-p", "0", "top_p must be in (0, 1]"), ("top-p", "1.5", "top_p must be in (0, 1]"),
    ("top-p", "nan", "top_p must be a finite"), ("min-p", "-0.1", "min_p must be in [0, 1]"),
    ("min-p", "1.5", "min_p must be in [0, 1]"), ("repetition-penalty", "0", "repetition_penalty must be > 0"),
    ("repetition-penalty", "-1", "repetition_penalty must be > 0"), ("seed", "-3", "seed must be an integer >= 0"),
    ("max-new-tokens", "0", "max_new_tokens must be an integer >= 1"),
    ("max-new-tokens", "-5", "max_new_tokens must be an integer >= 1"),
    ("speculate", "-1", "speculate must be an integer >= 0"),
]


@pytest.mark.parametrize("option, value, message", BAD_VALUES)
def test_bad_values_are_one_line_and_exit_1(stories260k, capsys, option, value, message):
    """Every sampling option is validated the same way: one line on stderr, exit 1, no traceback (in process: the
    same main() as the console script, so an exception would fail the test)."""
    from engine.cli import main

    sampling = [] if option == "temperature" else ["--temperature", "1"]
    code = main(["generate", "--model", str(stories260k), f"--{option}", value, *sampling, "x"])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err


def test_bad_seed_in_a_subprocess_is_one_line(stories260k):
    """The user's report: `tinyllama generate --seed -3 --temperature 1 Hi` ended in a NumPy traceback."""
    p = tinyllama("generate", "--model", str(stories260k), "--seed", "-3", "--temperature", "1", "Hi")
    assert "seed must be an integer >= 0" in one_line_error(p) and p.returncode == 1


def test_prompt_longer_than_window(stories260k):
    long_prompt = "the dog " * 400  # > 512 tokens
    line = one_line_error(tinyllama("generate", "--model", str(stories260k), long_prompt))
    assert "context window is 512" in line and "--truncate" in line
    p = tinyllama("generate", "--model", str(stories260k), "--truncate", "--max-new-tokens", "4", "--json",
                  long_prompt)
    assert p.returncode == 0, p.stderr
    from engine import load_model

    model = load_model(str(stories260k))
    ids = model.prompt_ids(long_prompt)
    assert json.loads(p.stdout)["prompt_token_ids"] == ids[-(512 - 4):]  # the API's rule: room for 4 new tokens
    assert model.complete(long_prompt, max_new_tokens=4, truncate=True).prompt_token_ids == ids[-(512 - 4):]


def test_broken_model_is_one_line(tmp_path, stories260k):
    (tmp_path / "config.json").write_text((stories260k / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((stories260k / "model.safetensors").read_bytes()[:5000])
    assert "truncated file" in one_line_error(tinyllama("generate", "--model", str(tmp_path), "x"))
    assert "no such model folder" in one_line_error(tinyllama("check", "--model", str(tmp_path / "nope")))


def test_uncached_default_model_offline_is_one_line(tmp_path):
    import os

    env_cache = str(tmp_path / "empty-hf-cache")
    p = subprocess.run([sys.executable, "-m", "engine", "check"], capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "HF_HUB_CACHE": env_cache, "HF_HUB_OFFLINE": "1"})
    line = one_line_error(p)
    assert "TinyLlama/TinyLlama-1.1B-Chat-v1.0" in line and "not in the Hugging Face cache" in line


def test_check_agrees_with_transformers(stories260k):
    p = tinyllama("check", "--model", str(stories260k), "--prompt", "Once upon a time", "--steps", "12")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "greedy tokens: 12/12 identical" in p.stdout and "OK: matches transformers" in p.stdout


def test_python_dash_m_engine_is_the_same_command(stories260k):
    p = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", str(stories260k), "--max-new-tokens",
                        "8", "Once upon a time"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0 and p.stdout.startswith(", there was")


def test_speculate_flag_gives_plain_output_and_reports_acceptance(stories260k):
    prompt = "Once upon a time, there was a little girl named Lily. She loved to play. Once upon a time"
    plain = tinyllama("generate", "--model", str(stories260k), "--json", "--max-new-tokens", "40", prompt)
    fast = tinyllama("generate", "--model", str(stories260k), "--json", "--max-new-tokens", "40", "--speculate", "5",
                     prompt, env=ALWAYS_DRAFT)
    a, b = json.loads(plain.stdout), json.loads(fast.stdout)
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert b["speculative"]["draft_tokens"] > 0 and 0 < b["speculative"]["acceptance_rate"] <= 1


def test_draft_flag_gives_plain_output_and_reports_what_was_kept(stories260k):
    """--speculate N --draft int4: the model's int4 copy drafts, the output is plain decoding's."""
    args = ("generate", "--model", str(stories260k), "--json", "--max-new-tokens", "40", "--ignore-eos")
    plain = json.loads(tinyllama(*args, "Once upon a time").stdout)
    p = tinyllama(*args, "--speculate", "4", "--draft", "int4", "--verbose", "Once upon a time", env=ALWAYS_DRAFT)
    fast = json.loads(p.stdout)
    assert fast["token_ids"] == plain["token_ids"]
    assert fast["speculative"]["draft_tokens"] > 0 and 0 < fast["speculative"]["acceptance_rate"] < 1
    assert "speculative (int4 draft)" in p.stderr
    bad = tinyllama("generate", "--model", str(stories260k), "--draft", "int8", "Hi")
    assert bad.returncode == 1 and "needs --speculate" in one_line_error(bad)


@pytest.mark.parametrize("command", ["serve", "chat", "generate"])
def test_draft_without_speculate_is_one_line(command, stories260k):
    p = tinyllama(command, "--model", str(stories260k), "--draft", "int4", *(["Hi"] if command == "generate" else []),
                  stdin="")
    assert p.returncode == 1 and "--draft int4 needs --speculate N" in one_line_error(p)


def test_triton_without_a_gpu_says_it_runs_the_interpreter(stories260k):
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the triton backend runs on it, and nothing is said")
    p = tinyllama("generate", "--model", str(stories260k), "--backend", "triton", "--max-new-tokens", "2",
                  "--temperature", "0", "Once upon a time", timeout=600)
    assert p.returncode == 0 and p.stdout.strip()
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Triton's CPU interpreter" in lines[0] and "numpy backend's speed" in lines[0]
    numpy = tinyllama("generate", "--model", str(stories260k), "--max-new-tokens", "2", "--temperature", "0",
                      "Once upon a time")
    assert numpy.stdout == p.stdout and "interpreter" not in numpy.stderr  # the same greedy tokens, said nothing
