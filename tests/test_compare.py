"""engine.compare_with_transformers (the report users assert on) and `tinyllama check`, whose whole point is the
mismatch path: an engine given perturbed weights must be reported, with the figures, and exit 1."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

import engine
from engine.cli import main
from engine.errors import EngineError
from tests.conftest import REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def stories(stories260k):
    return engine.load_model(str(stories260k))


@pytest.fixture(scope="module")
def report(stories260k):
    return engine.compare_with_transformers(str(stories260k), ["Once upon a time", [1, 291, 280]], steps=10)


def test_report_of_matching_weights(report, stories260k):
    assert report.ok and report.steps == 10 and report.backend == "numpy" and report.model == str(stories260k)
    assert [p.prompt for p in report.prompts] == ["Once upon a time", [1, 291, 280]]
    assert report.prompts[0].prompt_ids == [1, 403, 407, 261, 378]
    expected = json.loads((stories260k / "reference_outputs.json").read_text())
    for p in report.prompts:
        assert p.relative_difference < 1e-4 and 5 < p.logit_scale < 100  # a real logit scale, not 0 or 1
        assert p.greedy_identical and p.agreement == [True] * 10 and p.first_difference is None
        assert len(p.engine_tokens) == 10
    assert report.prompts[0].transformers_tokens == expected["greedy_from_prompt_ids_32"][5:15]  # transformers' own run
    assert report.versions["transformers"] == transformers.__version__
    assert report.versions["torch"] == torch.__version__ and report.versions["numpy"] == np.__version__
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["prompts"][1]["agreement"] == [True] * 10
    assert report.summary().endswith("greedy identical)") and report.summary().count("10/10 identical") == 2


def _scaled_final_norm(model, factor):
    model.backend.weights.final_norm = model.backend.weights.final_norm * np.float32(factor)
    return model


def _noisy_first_layer(model, scale):
    rng = np.random.default_rng(0)
    layer = model.backend.weights.layers[0]
    layer.wqkv = layer.wqkv + np.float32(scale) * rng.standard_normal(layer.wqkv.shape).astype(np.float32)
    return model


def test_report_of_an_engine_off_by_one_percent(stories260k):
    """Logits scaled by 1.01 (final norm weight): the argmax never changes, so only the logit figure catches it."""
    model = _scaled_final_norm(engine.load_model(str(stories260k)), 1.01)
    r = engine.compare_with_transformers(model, "Once upon a time", steps=8)
    p = r.prompts[0]
    assert p.greedy_identical and not r.ok
    assert p.relative_difference == pytest.approx(0.01, rel=0.05)  # |0.01 x logit| at the largest logit
    assert "MISMATCH" in r.summary() and "8/8 identical" in r.summary()


def test_report_of_an_engine_with_a_wrong_layer(stories260k):
    model = _noisy_first_layer(engine.load_model(str(stories260k)), 0.3)
    r = engine.compare_with_transformers(model, "Once upon a time", steps=12)
    p = r.prompts[0]
    assert not r.ok and not p.greedy_identical and p.relative_difference > 1e-2
    k = p.first_difference
    assert p.agreement[:k] == [True] * k and not p.agreement[k]
    assert p.engine_tokens[k] != p.transformers_tokens[k]
    assert f"first difference at step {k + 1}: engine {p.engine_tokens[k]}" in r.summary()


@pytest.mark.parametrize("perturb, json_out", [(lambda m: _scaled_final_norm(m, 1.01), False),
                                               (lambda m: _noisy_first_layer(m, 0.3), True)])
def test_check_command_reports_the_mismatch_and_exits_1(stories260k, monkeypatch, capsys, perturb, json_out):
    """`tinyllama check` (its main(), in process so the engine can be handed perturbed weights) on a perturbed copy."""
    from engine.cli import check

    monkeypatch.setattr(check, "load", lambda args: perturb(engine.load_model(args.model)))
    code = main(["check", "--model", str(stories260k), "--prompt", "Once upon a time", "--steps", "8"]
                + (["--json"] if json_out else []))
    out = capsys.readouterr().out
    assert code == 1
    if json_out:
        data = json.loads(out)
        assert data["ok"] is False and data["max_relative_difference"] > 1e-2
        assert data["prompts"][0]["greedy_identical"] is False
    else:
        assert out.rstrip().splitlines()[-1].startswith("MISMATCH")
        relative = float(re.search(r"\(([0-9.e+-]+) of the logit scale", out).group(1))
        assert relative == pytest.approx(0.01, rel=0.05)


def test_check_json_of_matching_weights(stories260k, capsys):
    code = main(["check", "--model", str(stories260k), "--steps", "4", "--json", "--prompt", "Once upon a time"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["ok"] is True and data["prompts"][0]["agreement"] == [True] * 4
    from engine.runtime import native

    kernels = data["native_kernels"]  # which variant ran, or why none did (tests/test_native_platforms.py)
    assert kernels["available"] == native.status().available and kernels["variant"] == native.status().isa
    assert kernels["reason"] == ("" if native.status().available else native.status().detail)


def test_check_says_why_the_kernels_are_missing(stories260k, capsys, monkeypatch):
    """Without the compiled kernels `check` names the reason, in its text and in --json."""
    from engine.runtime import native

    monkeypatch.setattr(native, "status", lambda: native.NativeStatus(False, "not built: no C compiler (cc)"))
    for json_out in (False, True):
        code = main(["check", "--model", str(stories260k), "--steps", "2"] + (["--json"] if json_out else []))
        out = capsys.readouterr().out
        assert code == 0
        if json_out:
            assert json.loads(out)["native_kernels"]["reason"] == "not built: no C compiler (cc)"
        else:
            assert "compiled kernels unavailable: not built: no C compiler (cc)" in out.splitlines()[1]


def test_bad_arguments_are_engine_errors(stories, monkeypatch):
    with pytest.raises(EngineError, match="steps must be an integer >= 1"):
        engine.compare_with_transformers(stories, "x", steps=0)
    with pytest.raises(EngineError, match="exceed the context window of 512"):
        engine.compare_with_transformers(stories, "x", steps=600)
    import engine.compare as compare

    monkeypatch.setattr(compare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EngineError, match="pip install transformers torch"):
        engine.compare_with_transformers(stories, "x", steps=2)


def test_the_docs_example_of_your_own_test_runs(stories260k):
    """docs/python-api.md's example of a user's own pytest test, run as written (with the model path filled in)."""
    text = (REPO / "docs" / "python-api.md").read_text()
    block = re.search(r"```python\n(# test_my_weights\.py.*?)```", text, re.S)
    assert block, "docs/python-api.md lost its compare_with_transformers example"
    code = block.group(1).replace('"path/to/model"', repr(str(stories260k)))
    namespace: dict = {}
    exec(compile(code, "docs/python-api.md", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test()


def test_check_of_a_folder_without_tokenizer_starts_from_bos(tmp_path, capsys):
    from tests.conftest import make_random_checkpoint

    folder = make_random_checkpoint(tmp_path / "ids-only", seed=5)
    code = main(["check", "--model", str(folder), "--steps", "5", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["ok"] is True
    assert data["prompts"][0]["prompt_ids"] == [1] and len(data["prompts"][0]["engine_tokens"]) == 5
