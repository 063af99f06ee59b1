"""The benchmark's quantized and speculative parts on stories260K: engine int8/int4 systems, a speculating system
(its output checked against plain decoding), `tinyllama bench --draft`'s speculative row, the fidelity table's
figures (against torch), and llama.cpp's quantizer for q4_0 / q4_K_M (skipped without llama-cpp-python)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import fidelity
from bench.systems import SpeculativeEngineRunner, engine_draft, engine_parts, make_runner

torch = pytest.importorskip("torch")


def test_system_names():
    assert engine_parts("engine-numpy-int4") == ("numpy", None, "int4")
    assert engine_parts("engine-numpy-avx2-int8") == ("numpy", "avx2", "int8")
    assert engine_parts("engine-numpy-draft-int8") == ("numpy", None, "auto")
    assert engine_draft("engine-numpy-draft-int4") == "int4" and engine_draft("engine-numpy-int4") is None


def test_int4_engine_system_decodes_what_the_int4_model_decodes(stories260k):
    import engine

    r = make_runner("engine-numpy-int4", str(stories260k), 1)
    r.load()
    assert r.dtype == "int4" and r.weight_bytes < engine.load_model(str(stories260k)).backend.weights.nbytes / 3
    ids = [1, 403, 407, 261, 378]
    r.decode_setup(1, ids)
    tokens = [r.first_tokens[0]]
    for _ in range(5):
        r.decode_step()
        tokens.append(r.next_tokens[0])
    assert tokens == engine.load_model(str(stories260k), weights_dtype="int4").generate(
        ids, max_new_tokens=6, ignore_eos=True, repetition_penalty=1.0)


@pytest.mark.usefixtures("always_draft")
def test_speculating_system_checks_its_output_and_times_blocks(stories260k):
    r = make_runner("engine-numpy-draft-int4", str(stories260k), 1)
    assert isinstance(r, SpeculativeEngineRunner) and r.draft == "int4"
    r.speculate = 3
    r.load()
    r.decode_setup(1, [1, 403, 407, 261, 378])  # raises if speculation changed the greedy tokens
    assert r.identical_tokens == r.check_tokens
    assert r.decode_block(16) > 0 and r.decode_block(16) > 0
    info = r.info()
    assert info["draft"] == "int4" and 0 < info["acceptance_rate"] <= 1 and "int4 draft" in info["kernel"]
    assert [s[2] for s in r.stats] == [17, 17]


@pytest.mark.usefixtures("always_draft")
def test_speculative_row_with_a_model_draft(stories260k):
    r = make_runner("engine-numpy", str(stories260k), 1)
    r.load()
    passage = r.model.prompt_ids("Once upon a time, there was a little girl named Lily.")
    row = r.speculative(passage, 24, 4, "int8")
    assert row["draft"] == "int8" and 0 < row["acceptance_rate"] <= 1
    assert row["draft_step_s"] > 0 and row["verify_step_s"] > 0 and row["speculative_tok_s"] > 0


def test_fidelity_scores_match_torch():
    rng = np.random.default_rng(0)
    ref, ours = rng.normal(size=(6, 40)) * 3, rng.normal(size=(6, 40)) * 3
    ids = [int(t) for t in rng.integers(0, 40, 6)]
    s = fidelity.scores(ref, ours, ids)
    f = torch.nn.functional
    r, o = torch.tensor(ref[:-1]), torch.tensor(ours[:-1])
    kl = f.kl_div(f.log_softmax(o, -1), f.log_softmax(r, -1), log_target=True, reduction="none").sum(-1)
    assert s["kl_mean"] == pytest.approx(float(kl.mean())) and s["kl_max"] == pytest.approx(float(kl.max()))
    assert s["perplexity"] == pytest.approx(float(torch.exp(f.cross_entropy(o, torch.tensor(ids[1:])))))
    assert s["perplexity_reference"] == pytest.approx(float(torch.exp(f.cross_entropy(r, torch.tensor(ids[1:])))))
    assert s["top1_agreement"] == pytest.approx(float((r.argmax(-1) == o.argmax(-1)).double().mean()))


def test_fidelity_run_on_stories(stories260k, tmp_path, capsys):
    """Each system in its own process: the engine's rows have figures; an unknown system is a failed row with its
    reason, and the run goes on."""
    out = tmp_path / "f.json"
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")
    assert fidelity.main(["--model", str(stories260k), "--text", str(text), "--systems",
                          "llama.cpp-nonsense,engine-int4", "--threads", "1", "--out", str(out)]) == 0
    rows = {r["system"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["llama.cpp-nonsense"]["status"] == "failed" and rows["llama.cpp-nonsense"]["note"]
    assert 0.5 < rows["engine-int4"]["top1_agreement"] <= 1 and 0 < rows["engine-int4"]["kl_mean"] < 1
    assert rows["engine-int4"]["perplexity"] > rows["engine-int4"]["perplexity_reference"] > 1
    assert "| engine-int4 |" in capsys.readouterr().out


def test_llamacpp_quantizer_makes_q4_0(stories260k):
    pytest.importorskip("llama_cpp")
    from bench import llamacpp

    path = llamacpp.gguf_for(stories260k, "q4_0")
    sys.path.insert(0, str(llamacpp.converter().parent / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0"  # 64 columns: two blocks of 32
