"""Fidelity of the inexact modes (int8 / int4 weights) in engine.compare_with_transformers and `tinyllama check`:
top-1 agreement and KL(transformers || engine) along transformers' greedy path, perplexity of both on a text, the
agreeing greedy prefix, and an exit status that follows the user's thresholds. Figures are recomputed here from
transformers' own logits with torch's log-softmax, KL and cross-entropy."""
from __future__ import annotations

import json

import numpy as np
import pytest

import engine
from engine.cli import main
from engine.runtime.batch import SequenceStep
from tests.conftest import make_random_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

TEXT = ("Once upon a time, there was a little boy named Tim. Tim had a red ball that he loved very much. One day, "
        "Tim and Sue went to the park. They threw the ball high into the sky, and it fell into a tree.")


def torch_reference(folder, ids):
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].double()


def torch_kl(ref, ours):
    """KL(softmax(ref) || softmax(ours)) per row with torch (float64)."""
    return F.kl_div(F.log_softmax(torch.as_tensor(ours).double(), -1), F.log_softmax(ref, -1), log_target=True,
                    reduction="none").sum(-1).numpy()


@pytest.fixture(scope="module")
def int4_report(stories260k):
    return engine.compare_with_transformers(str(stories260k), "Once upon a time", steps=24, weights_dtype="int4",
                                            text=TEXT)


def test_int4_fidelity_figures_match_torch(int4_report, stories260k):
    r = int4_report
    assert not r.exact and r.weights_dtype == "int4" and r.ok  # no thresholds: a report, exit 0
    p = r.prompts[0]
    # teacher-forced along transformers' greedy path: the rows predicting its 24 tokens
    path = p.prompt_ids + p.transformers_tokens[:-1]
    ref = torch_reference(stories260k, path)[len(p.prompt_ids) - 1:]
    model = engine.load_model(str(stories260k), weights_dtype="int4")
    ours = model.logits(path)[len(p.prompt_ids) - 1:]
    kl = torch_kl(ref, ours)
    assert p.fidelity.positions == 24
    assert p.fidelity.kl_mean == pytest.approx(kl.mean(), rel=1e-3, abs=1e-7)
    assert p.fidelity.kl_max == pytest.approx(kl.max(), rel=1e-3, abs=1e-7)
    agree = float(np.mean(ref.argmax(-1).numpy() == ours.argmax(-1)))
    assert p.fidelity.top1_agreement == pytest.approx(agree)
    assert 0.5 < agree < 1.0 and kl.max() > 1e-3  # int4 is visibly inexact on stories260K, and mostly right
    same = [a == b for a, b in zip(p.engine_tokens, p.transformers_tokens)]
    assert p.agreeing_prefix == (same.index(False) if False in same else 24)
    # the text: perplexity of both from torch's cross-entropy, agreement and KL at every position
    ids = model.prompt_ids(TEXT)
    ref_t = torch_reference(stories260k, ids)
    ours_t = model.logits(ids)
    t = r.text
    assert t.tokens == len(ids) and t.fidelity.positions == len(ids) - 1
    ppl_ref = float(torch.exp(F.cross_entropy(ref_t[:-1], torch.tensor(ids[1:]))))
    ppl_ours = float(torch.exp(F.cross_entropy(torch.as_tensor(ours_t[:-1]).double(), torch.tensor(ids[1:]))))
    assert t.perplexity_transformers == pytest.approx(ppl_ref, rel=1e-6)
    assert t.perplexity_engine == pytest.approx(ppl_ours, rel=1e-6) and t.perplexity_engine != pytest.approx(ppl_ref)
    assert t.fidelity.kl_mean == pytest.approx(torch_kl(ref_t[:-1], ours_t[:-1]).mean(), rel=1e-3, abs=1e-7)
    pooled = r.fidelity
    assert pooled.positions == 24 + len(ids) - 1
    assert pooled.kl_max == max(p.fidelity.kl_max, t.fidelity.kl_max)


def test_thresholds_decide_ok(int4_report):
    r = int4_report
    f = r.fidelity
    r.min_agreement, r.max_kl = f.top1_agreement - 0.01, f.kl_mean * 1.1
    assert r.ok and "OK: within the thresholds" in r.summary()
    r.min_agreement = min(1.0, f.top1_agreement + 0.01)
    assert not r.ok and "BELOW THRESHOLD" in r.summary()
    r.min_agreement, r.max_kl = None, f.kl_mean * 0.9
    assert not r.ok
    r.min_agreement = r.max_kl = None


def test_exact_mode_keeps_the_strict_check_and_reports_perfect_fidelity(stories260k):
    r = engine.compare_with_transformers(str(stories260k), "Once upon a time", steps=8)
    assert r.exact and r.ok
    assert r.fidelity.top1_agreement == 1.0 and r.fidelity.kl_max < 1e-8
    assert "fidelity" not in r.summary()  # the exact report reads as before


def test_int8_on_a_random_llama(tmp_path):
    folder = make_random_checkpoint(tmp_path / "m", dtype="bfloat16", seed=5)
    r = engine.compare_with_transformers(str(folder), [[1, 17, 42, 9]], steps=12, weights_dtype="int8")
    p = r.prompts[0]
    path = p.prompt_ids + p.transformers_tokens[:-1]
    ref = torch_reference(folder, path)[3:]
    ours = engine.load_model(str(folder), weights_dtype="int8").logits(path)[3:]
    assert p.fidelity.kl_mean == pytest.approx(torch_kl(ref, ours).mean(), rel=1e-3, abs=1e-8)
    assert 0 < p.fidelity.kl_mean < 0.05 and p.fidelity.top1_agreement >= 0.75


def test_check_cli_exit_status_follows_thresholds(stories260k, tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text(TEXT)
    base = ["check", "--model", str(stories260k), "--weights-dtype", "int4", "--steps", "16", "--text", str(text),
            "--prompt", "Once upon a time"]
    assert main(base + ["--json"]) == 0  # no thresholds: a report
    out = json.loads(capsys.readouterr().out)
    assert out["exact"] is False and out["weights_dtype"] == "int4" and out["ok"] is True
    assert set(out["fidelity"]) == {"positions", "top1_agreement", "kl_mean", "kl_max"}
    assert out["text"]["perplexity_engine"] > 0 and "agreeing_prefix" in out["prompts"][0]
    f = out["fidelity"]
    assert main(base + ["--min-agreement", "0.5", "--max-kl", str(2 * f["kl_mean"])]) == 0
    assert "OK: within the thresholds" in capsys.readouterr().out
    assert main(base + ["--min-agreement", "0.999"]) == 1
    assert "BELOW THRESHOLD" in capsys.readouterr().out
    assert main(base + ["--max-kl", str(f["kl_mean"] / 2)]) == 1
    capsys.readouterr()
    assert main(["check", "--model", str(stories260k), "--text", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read it" in capsys.readouterr().err
    assert main(base + ["--min-agreement", "95"]) == 1
    assert "fraction" in capsys.readouterr().err
