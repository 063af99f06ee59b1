"""Claims the README and its docs/ pages make that no other test held them to: thread-count precedence, the OpenBLAS
kernel choice and TINYLLAMA_BLAS_KERNEL, `generate --verbose` naming the kernel, scheduler batches of requests with
their own sampling, the load peak against the weight bytes, `/set min_p` / `/set repetition_penalty` in the REPL, and
that the structured output examples end (the constraint complete) on the model they name."""
from __future__ import annotations

import io
import json
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest

import engine
from engine.runtime import native
from engine.runtime.blas import AVX512_FLAGS, blas_info, cpu_flags
from tests.conftest import LOAD_PROBE, REPO


def python(code: str, env: dict, timeout: int = 120) -> str:
    """Run `code` in a fresh interpreter (NumPy not yet loaded) from the repository root -> its stdout."""
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def clean_env(**overrides) -> dict:
    """os.environ without the variables these claims are about, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "TINYLLAMA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TINYLLAMA_BLAS_KERNEL",
        "OPENBLAS_CORETYPE", "OPENBLAS_THREAD_TIMEOUT", "TINYLLAMA_NATIVE")}
    env.update(overrides)
    return env


# ---- threads: TINYLLAMA_NUM_THREADS, else OMP_NUM_THREADS, else OPENBLAS_NUM_THREADS, else the usable CPUs ---------

@pytest.mark.parametrize("settings, expected", [
    (dict(TINYLLAMA_NUM_THREADS="3", OMP_NUM_THREADS="5", OPENBLAS_NUM_THREADS="7"), 3),
    (dict(OMP_NUM_THREADS="5", OPENBLAS_NUM_THREADS="7"), 5),
    (dict(OPENBLAS_NUM_THREADS="7"), 7),
    (dict(TINYLLAMA_NUM_THREADS="0", OMP_NUM_THREADS="x", OPENBLAS_NUM_THREADS="6"), 6),  # unusable values skipped
    ({}, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
])
def test_thread_count_precedence(monkeypatch, settings, expected):
    for var in ("TINYLLAMA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in settings.items():
        monkeypatch.setenv(var, value)
    assert native.thread_count() == expected


@pytest.mark.skipif(not native.status().available, reason=f"no compiled matmul here: {native.status().detail}")
def test_the_kernel_runs_on_the_thread_count_it_was_given(tmp_path):
    code = "from engine.runtime import native; print(native.status().detail)"
    detail = python(code, clean_env(TINYLLAMA_NUM_THREADS="3", OMP_NUM_THREADS="1",
                                    TINYLLAMA_CACHE=str(native.cache_dir())))
    assert detail.startswith("avx512, 3 threads,")


# ---- OpenBLAS's kernel: chosen before NumPy loads ------------------------------------------------------------------

x86_openblas = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or blas_info().get("library") != "openblas",
    reason="the kernel names (SkylakeX, Haswell) are OpenBLAS's x86 kernels")
BLAS_PROBE = ("import json, os, engine; from engine.runtime.blas import blas_info; "
              "print(json.dumps([os.environ.get('OPENBLAS_CORETYPE'), blas_info()['kernel'], "
              "os.environ.get('OPENBLAS_THREAD_TIMEOUT')]))")
HAS_AVX512 = AVX512_FLAGS <= cpu_flags()


def blas_choice(code: str = BLAS_PROBE, **env) -> list:
    return json.loads(python(code, clean_env(**env)))


@x86_openblas
def test_auto_asks_for_skylakex_on_avx512_and_leaves_others_alone():
    coretype, kernel, timeout = blas_choice()
    if HAS_AVX512:
        assert coretype == kernel == "SkylakeX"
        assert blas_choice(OPENBLAS_CORETYPE="Haswell")[:2] == ["SkylakeX", "SkylakeX"]  # auto overrides it
    else:
        assert coretype is None
    assert timeout == "4"  # idle OpenBLAS threads sleep at once
    assert blas_choice(OPENBLAS_THREAD_TIMEOUT="32")[2] == "32"  # ... unless the user set it


@x86_openblas
def test_a_named_kernel_is_used():
    assert blas_choice(TINYLLAMA_BLAS_KERNEL="Haswell")[:2] == ["Haswell", "Haswell"]
    assert blas_choice(TINYLLAMA_BLAS_KERNEL="Haswell", OPENBLAS_CORETYPE="SkylakeX")[:2] == ["Haswell", "Haswell"]


@x86_openblas
def test_keep_leaves_openblas_coretype_alone():
    assert blas_choice(TINYLLAMA_BLAS_KERNEL="keep", OPENBLAS_CORETYPE="Haswell")[:2] == ["Haswell", "Haswell"]
    coretype, kernel, _ = blas_choice(TINYLLAMA_BLAS_KERNEL="keep")
    baseline = python("import numpy, threadpoolctl; print([i['architecture'] for i in threadpoolctl.threadpool_info()"
                      " if i['user_api'] == 'blas'][0])", clean_env())
    assert coretype is None and kernel == baseline  # OpenBLAS's own detection


@x86_openblas
def test_too_late_once_numpy_is_loaded():
    """The choice is made when `engine` is imported before NumPy; after, OpenBLAS's kernel is already fixed."""
    late = BLAS_PROBE.replace("import json, os, engine;", "import json, os, numpy, engine;")
    coretype, kernel, _ = blas_choice(late, TINYLLAMA_BLAS_KERNEL="Haswell")
    assert coretype is None and kernel != "Haswell"


# ---- `tinyllama generate --verbose` names what ran the matmuls -----------------------------------------------------

def verbose_kernel(stories260k, **env) -> str:
    done = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", str(stories260k), "--verbose",
                           "--max-new-tokens", "3", "Once upon a time"], env=clean_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = re.findall(r"backend: (\w+ \([^)]*\))", done.stderr)
    assert len(found) == 1, done.stderr
    return found[0]


@x86_openblas
def test_generate_verbose_names_the_kernel(stories260k):
    without_native = verbose_kernel(stories260k, TINYLLAMA_NATIVE="0", TINYLLAMA_BLAS_KERNEL="Haswell")
    assert without_native == "numpy (openblas Haswell)"
    if HAS_AVX512 and native.status().available:  # the compiled kernels, by the instruction set they were built for
        assert verbose_kernel(stories260k, TINYLLAMA_CACHE=str(native.cache_dir())).startswith("numpy (native avx512")


# ---- a scheduler batch whose requests each have their own sampling -------------------------------------------------

REQUESTS = [  # (prompt, options): different lengths, samplers and seeds in one batch
    ("Once upon a time", dict(temperature=0.8, seed=1)),
    ("The dog ran", dict(temperature=1.3, top_k=20, seed=2)),
    ("Lily and Tom went to the park. They saw a", dict()),  # greedy
    ("Once upon a time", dict(temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=3)),
    ("Once upon a time", dict(temperature=0.8, seed=4)),  # the first request's prompt and sampler, another seed
]


def test_scheduler_requests_with_their_own_sampling_equal_each_alone(stories260k):
    model = engine.load_model(str(stories260k))
    scheduler = engine.Scheduler(model, prefill_chunk=4)
    requests = [scheduler.submit(model.prompt_ids(p), max_new_tokens=24, ignore_eos=True, **o) for p, o in REQUESTS]
    for _ in scheduler.run():
        pass
    alone = [model.generate(p, max_new_tokens=24, ignore_eos=True, **o) for p, o in REQUESTS]
    assert [r.result.token_ids for r in requests] == alone
    assert alone[0] != alone[4]  # the seed mattered, so equality above is per request, not luck


# ---- the load peak against the weight bytes ------------------------------------------------------------------------

LOAD_PEAK_RATIO = 1.05  # docs/benchmarks.md: "the load peak stays within 1.05x of the weight bytes" (after load)
CHECKPOINT_DTYPE = "float32"  # the dtype the checkpoint is saved in
# ~330 MB in fp32, big enough for the ratio to mean something; as in TinyLlama, the embedding table and lm_head are
# the largest tensors (the peak once held a whole tensor's file pages beside its copy: 1.2x here, 1.06x for TinyLlama)
LOAD_SHAPE = dict(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                  num_attention_heads=16, num_key_value_heads=2)

WRITE_CHECKPOINT = """
import json, sys
import numpy as np
from safetensors.numpy import save_file
from engine.config import ModelConfig

folder, shape, dtype = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
config = dict(shape, architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
block = (0.02 * np.random.default_rng(0).standard_normal(1 << 20)).astype(dtype)
tensors = {name: np.resize(block, s) for name, s in ModelConfig.from_dict(config).tensor_shapes().items()}
open(folder + "/config.json", "w").write(json.dumps(config))
save_file(tensors, folder + "/model.safetensors")
print(sum(t.nbytes for t in tensors.values()))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS / VmHWM from /proc (Linux)")
def test_load_peak_is_within_the_stated_ratio_of_the_weights(tmp_path):
    """RSS peak during load_model, less the RSS before it, against the weight bytes the model holds, in a fresh
    process. The peak is VmHWM, this process's own: getrusage's ru_maxrss also counts the resident set of the
    process it was forked from (Linux carries it across exec), which is pytest's, holding models of other tests."""
    folder = tmp_path / "model"
    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", WRITE_CHECKPOINT, str(folder), json.dumps(LOAD_SHAPE),
                           CHECKPOINT_DTYPE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    file_bytes = int(done.stdout)
    done = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(folder)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout)
    assert m["weight_bytes"] == file_bytes * 4 // np.dtype(CHECKPOINT_DTYPE).itemsize  # held as fp32
    ratio = (m["peak"] - m["before"]) / m["weight_bytes"]
    assert 0.95 < ratio <= LOAD_PEAK_RATIO, f"load peak {ratio:.3f}x the weight bytes"
    claim = f"within {LOAD_PEAK_RATIO}x of the weight bytes"  # the claim this test holds
    assert claim in (REPO / "docs" / "benchmarks.md").read_text()


def test_the_chunked_copy_is_exact_across_chunk_and_page_boundaries(tmp_path, monkeypatch):
    """The loader releases file pages every COPY_CHUNK_BYTES; chunks that straddle pages still copy every element."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from weights import safetensors_file

    monkeypatch.setattr(safetensors_file, "COPY_CHUNK_BYTES", 3 * 4096 + 6)
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(1001, 37).to(torch.bfloat16),
               "c": torch.randn(77, 999).to(torch.float16), "d": torch.randn(4097)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with safetensors_file.SafetensorsFile(tmp_path / "m.safetensors") as f:
        for name, t in tensors.items():
            assert np.array_equal(f.read(name), t.float().numpy()), name


# ---- /set min_p and /set repetition_penalty in the REPL ------------------------------------------------------------

def repl_reply(model, commands: list[str], message: str) -> str:
    """What `tinyllama chat` prints for `message` after `commands`, its stdin a pipe (the same Repl, in process)."""
    from engine.cli.chat import Repl
    from engine.generation.chat import ChatSession

    out, err = io.StringIO(), io.StringIO()
    repl = Repl(ChatSession(model), interactive=False, stdin=io.StringIO("\n".join(commands + [message]) + "\n"),
                stdout=out, stderr=err)
    assert repl.run() == 0
    assert "error" not in err.getvalue(), err.getvalue()
    return out.getvalue()


def api_reply(model, message: str, **options) -> str:
    """The same reply from the Python API on the chat prompt, as the REPL prints it."""
    ids = model.tokenizer.encode_chat([{"role": "user", "content": message}], add_generation_prompt=True)
    return model.complete(ids, **options).text.lstrip() + "\n"


@pytest.mark.parametrize("name, value, base", [
    ("min_p", "0.3", dict(temperature=1.5, seed=3)),
    ("repetition_penalty", "1.8", dict(temperature=0.0)),
])
def test_repl_set_changes_the_reply_as_the_api_does(tiny_chat_model, name, value, base):
    model = engine.load_model(str(tiny_chat_model))
    settings = [f"/set {k} {v}" for k, v in dict(base, max_new_tokens=30).items()]
    message = "Tell me a story about a robot and a robot"
    plain = repl_reply(model, settings, message)
    changed = repl_reply(model, settings + [f"/set {name} {value}"], message)
    assert plain == api_reply(model, message, max_new_tokens=30, **base)
    assert changed == api_reply(model, message, max_new_tokens=30, **base, **{name: float(value)})
    assert changed != plain


# ---- structured output: every example ends on the model it names; the unbounded one is cut off, and said so ---------
def structured_block() -> str:
    text = (REPO / "docs" / "structured-output.md").read_text()
    block = re.search(r"```python\n(model = engine\.load_model\(\"\.\./shared/models/stories260K\"\).*?)```", text, re.S)
    assert block, "docs/structured-output.md lost its example"
    return block.group(1)


def test_the_structured_output_examples_end_on_the_model_they_name(stories260k):
    model = engine.load_model(str(stories260k))
    calls = []

    class Recording:  # the example's `model`, keeping each call's keywords and result
        def complete(self, prompt, **options):
            result = model.complete(prompt, **options)
            calls.append((options, result))
            return result

    names = {"engine": type("E", (), {"load_model": staticmethod(lambda ref: Recording())}), "json": json}
    exec(compile(structured_block(), "docs/structured-output.md", "exec"), names)
    assert len(calls) == 4
    for options, result in calls:
        assert result.stop_reason == "constraint_done", (options, result.text)  # ended by the constraint itself
    assert set(json.loads(calls[0][1].text)) == {"name", "age"}
    # the page: json_object=True has no bounds, so on stories260K it runs to max_new_tokens
    r = model.complete("Once upon a time", json_object=True, max_new_tokens=32)
    assert r.stop_reason == "max_new_tokens" and len(r.token_ids) == 32


def test_generate_says_when_a_constrained_output_was_cut_off(stories260k, tmp_path, capsys):
    from engine.cli.main import build_parser, main

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}  # the page's, as a schema.json
    assert 'additionalProperties": False' in structured_block() and '"maxLength": 20' in structured_block()
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    for flags in (["--json-schema", str(tmp_path / "schema.json"), "A user as JSON:"],
                  ["--choice", "yes", "--choice", "no", "Is the sky blue?"]):  # the page's two command lines
        assert main(["generate", "--model", str(stories260k), "--json", *flags]) == 0
        out, err = capsys.readouterr()
        data = json.loads(out)
        assert data["stop_reason"] == "constraint_done" and data["constraint_complete"] is True
        assert data["warnings"] == [] and err == ""
    assert main(["generate", "--model", str(stories260k), "--json-object", "--max-new-tokens", "12",
                 "Once upon a time"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("{") and err.count("\n") == 1
    assert err.startswith("tinyllama: warning: the output was cut off by --max-new-tokens (12) before it completed "
                          "--json-object: it does not match it")
    assert main(["generate", "--model", str(stories260k), "--json-object", "--max-new-tokens", "12", "--json",
                 "Once upon a time"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["constraint_complete"] is False and data["warnings"] == [err.strip()]
    assert main(["generate", "--model", str(stories260k), "--max-new-tokens", "3", "--json", "Hi"]) == 0
    data = json.loads(capsys.readouterr().out)  # no constraint: nothing to complete
    assert "constraint_complete" not in data and data["warnings"] == []
    help_text = next(g for g in build_parser()._subparsers._group_actions[0].choices["generate"]._action_groups
                     if g.title and g.title.startswith("structured output")).title
    assert "guaranteed to match it unless cut off" in help_text
