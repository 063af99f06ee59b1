"""`python -m bench.interleave`: systems in one process timed in alternating blocks; ratios per block."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import interleave
from engine.errors import EngineError

REPO = Path(__file__).resolve().parent.parent


class FakeRunner:
    """Records the order it is timed in; each step sleeps `step_s`."""

    def __init__(self, name, log, step_s):
        self.name, self.log, self.step_s = name, log, step_s

    def decode_reset(self):
        self.log.append(self.name)

    def decode_step(self):
        import time

        time.sleep(self.step_s)


def test_every_block_times_each_system_once_in_rotated_order():
    log = []
    runners = {n: FakeRunner(n, log, 0.001) for n in "abc"}
    rates = interleave.interleave(runners, blocks=4, tokens=2)
    assert log == list("abc" "bca" "cab" "abc")
    assert {n: len(r) for n, r in rates.items()} == {"a": 4, "b": 4, "c": 4}


def test_a_ratio_is_the_median_of_same_block_ratios():
    # Block spells: the second block is twice as fast for both systems; per-block ratios 0.5, 0.5, 0.25.
    rates = {"engine": [10.0, 20.0, 12.0], "other": [5.0, 10.0, 3.0]}
    s = interleave.summarize(rates, {"engine": 2_000_000_000, "other": None})
    assert s["ratios_to"] == "engine"
    assert s["systems"]["other"]["ratio"] == 0.5
    assert s["systems"]["engine"]["ratio"] == 1.0
    assert s["systems"]["engine"]["median_tok_s"] == 12.0 and s["systems"]["engine"]["read_gbs_at_median"] == 24.0
    assert s["systems"]["other"]["read_gbs_at_median"] is None


def test_system_lists_a_process_cannot_run_are_refused():
    with pytest.raises(EngineError, match="one engine kernel variant per process"):
        interleave.check_systems(["engine-numpy-avx2", "engine-numpy-portable"])
    interleave.check_systems(["engine-numpy-avx2", "engine-numpy-avx2-float32", "llama.cpp-f16"])
    with pytest.raises(EngineError, match="unknown system 'vllm-fp8'"):
        interleave.check_systems(["engine-numpy", "vllm-fp8"])
    with pytest.raises(EngineError, match="distinct"):
        interleave.check_systems(["engine-numpy", "engine-numpy"])


def test_interleaved_runners_keep_their_own_sequences(stories260k):
    """The engine and transformers decode stories260K greedily side by side in one process: after the same blocks
    each has generated transformers' greedy tokens (interleaving shares no state between them)."""
    pytest.importorskip("torch")
    from bench.systems import make_runner

    ids = [1, 400, 35, 102, 7, 88, 219, 3]
    runners = {n: make_runner(n, str(stories260k), 1) for n in ("engine-numpy", "transformers-fp32")}
    for r in runners.values():
        r.room = 64
        r.load()
        r.decode_setup(1, ids)
    interleave.interleave(runners, blocks=3, tokens=5)
    engine_next = [int(t) for t in runners["engine-numpy"].next_tokens]
    torch_next = [int(t) for t in runners["transformers-fp32"].next_tokens.reshape(-1)]
    assert engine_next == torch_next

    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(stories260k), torch_dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=1 + 1 + 5, do_sample=False)
    assert engine_next == [int(out[0, -1])]  # the prompt's token, the warm step's, then 5 timed steps' (per block)


def test_command_line_one_line_errors_and_a_run(tmp_path, stories260k):
    bad = subprocess.run([sys.executable, "-m", "bench.interleave", "--blocks", "0"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--blocks must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
    mixed = subprocess.run([sys.executable, "-m", "bench.interleave", "--model", str(stories260k), "--systems",
                            "engine-numpy-avx2,engine-numpy-portable"], cwd=REPO, capture_output=True, text=True,
                           timeout=60)
    assert mixed.returncode == 1 and "one engine kernel variant" in mixed.stderr and "Traceback" not in mixed.stderr
    out = tmp_path / "ab.json"
    run = subprocess.run([sys.executable, "-m", "bench.interleave", "--model", str(stories260k), "--systems",
                          "engine-numpy,engine-numpy-float32", "--blocks", "2", "--tokens", "4", "--prompt-len", "8",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    # stories260K is an fp32 checkpoint: both systems hold fp32 weights and read the same bytes per token
    a, b = result["systems"]["engine-numpy"], result["systems"]["engine-numpy-float32"]
    assert len(a["tok_s"]) == len(b["tok_s"]) == 2 and min(a["tok_s"] + b["tok_s"]) > 0
    assert a["decode_bytes"] == b["decode_bytes"] > 4 * 260_000 * 0.9
    assert "engine-numpy-float32" in run.stdout and "x  (native" in run.stdout
