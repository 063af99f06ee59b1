"""The benchmark's arithmetic against systems whose costs are known: a fake runner driven through the real worker
(bench.worker.run_system) and report (bench.report), so a wrong rate formula (batch factor, median/min/max, prefill
tokens / time) or a wrong floor (bytes read per decoded token) fails here; and the /proc/stat busy measure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench import report, roofline, systems, worker
from bench.cpu_load import OthersBusy, others_busy_now

VOCAB = 64


class FakeClock:
    """A perf_counter that only the fake system advances: costs are exact."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class KnownCostRunner(systems.Runner):
    """A system with known costs: prefill PREFILL_S[call] seconds per prompt token (one entry per timed call, after
    a warm-up call), a decode step STEP_S[repeat] seconds whatever the batch (the warm-up steps: WARMUP_STEP_S)."""

    PREFILL_S = [0.5e-3, 2e-3, 1e-3, 1e-3, 4e-3, 0.5e-3]  # per token: two prompt lengths x three repeats
    WARMUP_PREFILL_S = 9.9
    WARMUP_STEP_S = 0.3
    STEP_S = [0.02, 0.005, 0.08]  # per step, repeat by repeat: median 0.02, fastest 0.005, slowest 0.08
    weight_bytes, decode_bytes, weight_count = 8_000_000_000, 6_000_000_000, 2_000_000_000

    def __init__(self, advance):
        self.advance = advance  # advance(seconds): the clock the worker reads moves on
        self.prefills = -1  # the first call is the warm-up
        self.repeat = -1

    def load(self):
        self.advance(1.5)

    def info(self):
        return {"kernel": "known-cost"}

    def prefill(self, ids) -> int:
        self.advance(self.PREFILL_S[self.prefills] * len(ids) if self.prefills >= 0 else self.WARMUP_PREFILL_S)
        self.prefills += 1
        return 0

    def decode_setup(self, batch, ids):
        self.repeat = -1

    def decode_reset(self):
        self.repeat += 1

    def decode_step(self):
        self.advance(self.STEP_S[self.repeat] if self.repeat >= 0 else self.WARMUP_STEP_S)


def run_worker(monkeypatch, capsys, tmp_path, runner_factory, **spec) -> list[dict]:
    """bench.worker.run_system on `spec` with make_runner returning the fake -> the rows it emitted."""
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    monkeypatch.setattr(systems, "make_runner", lambda name, folder, threads: runner_factory())
    full = dict(system="engine-numpy", folder=str(tmp_path), threads=1, speculate=0)
    full.update(spec)
    assert worker.run_system(full) == 0
    events = [json.loads(line[len(worker.MARK):]) for line in capsys.readouterr().out.splitlines()
              if line.startswith(worker.MARK)]
    rows = [row for e in events if e["event"] == "rows" for row in e["rows"]]
    assert rows, events
    return rows


def test_rates_from_known_costs(monkeypatch, capsys, tmp_path):
    clock = FakeClock()
    monkeypatch.setattr(worker, "time", clock)

    def advance(seconds):
        clock.now += seconds

    monkeypatch.setattr(worker, "read_bandwidth_now", lambda threads, quick: 18.0)  # the read rate at decode time
    rows = run_worker(monkeypatch, capsys, tmp_path, lambda: KnownCostRunner(advance), prompt_lens=[10, 40],
                      batches=[1, 4], new_tokens=5, repeats=3)
    prefill = {r["prompt_tokens"]: r for r in rows if r["kind"] == "prefill"}
    decode = {r["batch"]: r for r in rows if r["kind"] == "decode"}
    assert set(prefill) == {10, 40} and set(decode) == {1, 4}
    # prefill: tokens / seconds; three calls per length cost 0.5, 2, 1 ms (10 tokens) then 1, 4, 0.5 ms (40) a token
    p10, p40 = prefill[10], prefill[40]
    spread = ("prefill_tok_s", "prefill_tok_s_min", "prefill_tok_s_max")
    assert tuple(p10[k] for k in spread) == pytest.approx((1000, 500, 2000))
    assert tuple(p40[k] for k in spread) == pytest.approx((1000, 250, 2000))
    assert (p10["ttft_s"], p10["ttft_s_min"], p10["ttft_s_max"]) == pytest.approx((0.01, 0.005, 0.02))
    # decode: batch x steps / seconds, aggregate over the batch; steps cost 20, 5, 80 ms in the three repeats
    for b, r in decode.items():
        assert (r["decode_tok_s"], r["decode_tok_s_min"], r["decode_tok_s_max"]) == pytest.approx(
            (b / 0.02, b / 0.08, b / 0.005))
        assert r["new_tokens"] == 5 and r["prompt_tokens"] == 10
    assert all(r["load_s"] == pytest.approx(1.5) and r["decode_bytes"] == 6_000_000_000 for r in rows)

    # the report: each row's floor is its bytes read per decoded token over the read bandwidth
    machine = {"roofline": {"read_gbs": 12.0, "gemv_gbs": 11.0, "matmul_gflops": 100.0}, "cores": 2}
    model = {"fp32_weight_bytes": 8_000_000_000, "fp32_decode_bytes": 6_000_000_000, "weight_count": 2_000_000_000,
             "folder": "fake"}
    report.add_roofline(rows, machine, model)
    floor = 12e9 / 6e9
    assert machine["roofline"]["decode_floor_fp32_tok_s"] == pytest.approx(floor)
    assert machine["roofline"]["decode_floor_bf16_tok_s"] == pytest.approx(2 * floor)
    assert machine["roofline"]["prefill_ceiling_fp32_tok_s"] == pytest.approx(100e9 / 4e9)
    assert decode[1]["floor_tok_s"] == pytest.approx(floor)
    # % of floor against the bandwidth read just before that decode (18 GB/s), not the roofline's at the start
    assert decode[1]["read_gbs_now"] == 18.0 and "read_gbs_now" not in decode[4]
    assert decode[1]["floor_now_tok_s"] == pytest.approx(18e9 / 6e9)
    assert decode[1]["pct_of_floor"] == pytest.approx(100 * (1 / 0.02) / 3)
    assert "pct_of_floor" not in decode[4]  # the floor is a batch-1 figure
    text = report.table({"rows": rows, "machine": machine, "model": model, "settings": dict(
        threads=1, repeats=3, prompt_lens=[10, 40], new_tokens=5)})
    assert "1667%" in text  # 50 tok/s against a floor of 3 tok/s then
    assert "50.0 [12.5-200.0]" in text and "1,000 [250.0-2,000]" in text


class SleepingRunner(KnownCostRunner):
    """The same costs as real sleeps (a clock that misses sleeping, such as process time, would show)."""

    STEP_S = [0.02, 0.01, 0.04]
    PREFILL_S = [1e-3] * 6
    WARMUP_PREFILL_S = WARMUP_STEP_S = 0.01

    def __init__(self):
        super().__init__(time.sleep)

    def load(self):
        pass


def test_rates_from_real_sleeps(monkeypatch, capsys, tmp_path):
    rows = run_worker(monkeypatch, capsys, tmp_path, SleepingRunner, prompt_lens=[8], batches=[1, 8], new_tokens=3,
                      repeats=3)
    for r in rows:
        if r["kind"] == "decode":  # a sleep lasts at least as asked: rates at most the ideal, and not far below it
            b = r["batch"]
            assert b / 0.02 * 0.6 < r["decode_tok_s"] <= b / 0.02 * 1.01
            assert b / 0.04 * 0.6 < r["decode_tok_s_min"] <= b / 0.04 * 1.01
            assert b / 0.01 * 0.6 < r["decode_tok_s_max"] <= b / 0.01 * 1.01
        else:
            assert 1000 * 0.6 < r["prefill_tok_s"] <= 1000 * 1.01


def test_decode_bytes_leave_out_an_untied_embedding_table():
    assert roofline.decode_bytes(100, 30, tied=False) == 70
    assert roofline.decode_bytes(100, 30, tied=True) == 100  # the table is the lm_head: read whole every token


def test_model_summary_and_engine_runner_count_the_bytes_read_per_token(tmp_path, stories260k):
    from bench.run import model_summary
    from tests.conftest import make_random_checkpoint

    settings = dict(prompt_lens=[4], new_tokens=4)
    untied = make_random_checkpoint(tmp_path / "untied", vocab_size=300, hidden_size=32, intermediate_size=64,
                                    num_attention_heads=4, num_key_value_heads=2)
    s = model_summary(untied, settings)
    embed = 300 * 32 * 4
    assert s["fp32_decode_bytes"] == s["fp32_weight_bytes"] - embed and not s["tie_word_embeddings"]
    tied = model_summary(stories260k, settings)
    assert tied["fp32_decode_bytes"] == tied["fp32_weight_bytes"] == 4 * 260_032
    for folder, expected, row in ((untied, s["fp32_decode_bytes"], 32 * 4),
                                  (stories260k, tied["fp32_decode_bytes"], 0)):
        runner = systems.EngineRunner(str(folder), "numpy")
        runner.load()
        assert expected <= runner.decode_bytes <= expected + row  # the one embedding row gathered may be counted


def test_the_default_runs_fit_tinyllamas_window_and_longer_ones_are_refused(tinyllama_tokenizer_dir):
    """TinyLlama's real config (2048 positions): the default prompts, decode steps and 2000-token context fit (the
    long-context run holds exactly its context); one token past the window is a clear error, not a failed run."""
    from bench import cli
    from bench.run import WARMUP_ROOM, model_summary
    from engine.errors import EngineError

    defaults = dict(prompt_lens=[int(p) for p in cli.DEFAULT_PROMPT_LENS.split(",")], new_tokens=cli.DEFAULT_NEW_TOKENS,
                    long_context=cli.DEFAULT_LONG_CONTEXT)
    assert model_summary(tinyllama_tokenizer_dir, defaults)["max_position_embeddings"] == 2048
    assert model_summary(tinyllama_tokenizer_dir, dict(defaults, long_context=2048))
    with pytest.raises(EngineError, match="--long-context 2049.*context window of 2048"):
        model_summary(tinyllama_tokenizer_dir, dict(defaults, long_context=2049))
    with pytest.raises(EngineError, match="--prompt-len 2000 \\+ --new-tokens 64.*context window of 2048"):
        model_summary(tinyllama_tokenizer_dir, dict(defaults, prompt_lens=[2000]))
    assert model_summary(tinyllama_tokenizer_dir, dict(defaults, prompt_lens=[2048 - 64 - WARMUP_ROOM]))
    with pytest.raises(EngineError, match="leaves no prompt"):
        model_summary(tinyllama_tokenizer_dir, dict(defaults, long_context=64 + WARMUP_ROOM))


def test_busy_warning_names_the_cores_other_processes_took():
    assert report.busy_warning({"cpu_busy": {"others_before": 0.1, "others_during": 0.2}, "cores": 2}) is None
    line = report.busy_warning({"cpu_busy": {"others_before": 0.05, "others_during": 1.3}, "cores": 2})
    assert line.startswith("warning:") and "1.30 on average during it (of 2)" in line
    assert report.busy_warning({"cpu_busy": {"others_before": None, "others_during": None}}) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="CPU busy time comes from /proc/stat (Linux)")
def test_others_busy_counts_a_spinning_process():
    spin = "import time\nt = time.time() + 1.5\nwhile time.time() < t: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.2)  # the interpreter is up and spinning
        assert others_busy_now(1.0) >= 0.6  # one spinning core (other load only adds)
    finally:
        spinner.wait()


def test_others_busy_leaves_out_this_process_and_its_workers(monkeypatch):
    """Cores busy over the window, less the CPU time of this process and its waited-for workers, per second."""
    from bench import cpu_load

    readings = {"busy": 100.0, "own": 10.0, "now": 50.0}
    monkeypatch.setattr(cpu_load, "busy_cpu_seconds", lambda: readings["busy"])
    monkeypatch.setattr(cpu_load, "own_cpu_seconds", lambda: readings["own"])
    monkeypatch.setattr(cpu_load.time, "monotonic", lambda: readings["now"])
    probe = OthersBusy()
    readings.update(busy=100.0 + 7.0, own=10.0 + 4.0, now=50.0 + 4.0)  # 4 s: 7 CPU-s busy, 4 of them ours
    assert probe.cores() == pytest.approx(0.75)
    readings.update(busy=100.0 + 3.0)  # our own count can exceed the sample's granularity: never negative
    assert probe.cores() == 0.0


def test_rounds_merge_to_the_median_of_each_rounds_figure():
    from bench.run import merge_machines, merge_rounds

    def decode(rate, lo, hi, rss, read):
        return dict(label="engine-numpy", kind="decode", batch=1, prompt_tokens=128, status="ok", decode_tok_s=rate,
                    decode_tok_s_min=lo, decode_tok_s_max=hi, peak_rss_bytes=rss, read_gbs_now=read)

    rounds = [[decode(10.0, 9.0, 11.0, 5, 30.0)], [decode(14.0, 13.0, 15.0, 7, 40.0)], [decode(11.0, 8.0, 12.0, 6, 35.0)]]
    (row,) = merge_rounds(rounds)
    assert row["decode_tok_s"] == 11.0 and row["rounds"]["decode_tok_s"] == [10.0, 14.0, 11.0]
    assert (row["decode_tok_s_min"], row["decode_tok_s_max"]) == (8.0, 15.0)
    assert row["peak_rss_bytes"] == 7 and row["read_gbs_now"] == 35.0
    assert merge_rounds(rounds[:1]) == rounds[0]  # one round: as it is
    machine = merge_machines([{"cores": 2, "roofline": {"read_gbs": r, "blas": "x"}} for r in (30.0, 50.0, 40.0)])
    assert machine["roofline"] == {"read_gbs": 40.0, "blas": "x"} and len(machine["roofline_rounds"]) == 3


def test_a_small_model_gets_units_that_fit_and_a_noisy_speedup_is_marked():
    """stories260K's `bench --quick` once printed '0.000 B parameters, 0.00 GB' and a speculative 2.22x at 0% of
    drafts accepted as if it were a gain."""
    model = {"folder": "stories260K", "weight_count": 260_032, "fp32_weight_bytes": 1_040_128,
             "fp32_decode_bytes": 1_040_128}
    base = dict(label="engine-numpy", status="ok", dtype="float32", blas_kernel="native avx512", load_s=0.01,
                weight_bytes=1_040_128, decode_bytes=1_040_128, peak_rss_bytes=54_200_000, repeats=1)
    rows = [dict(base, kind="speculative", batch=1, draft="lookup", draft_tokens=4, plain_decode_tok_s=1000.0,
                 decode_tok_s=2220.0, decode_tok_s_min=2220.0, decode_tok_s_max=2220.0, speedup=2.22,
                 acceptance_rate=0.0, step_s=1e-3, verify_step_s=1.6e-3)]
    text = report.table({"rows": rows, "machine": {}, "model": model, "settings": dict(
        threads=1, repeats=1, prompt_lens=[32], new_tokens=8)})
    assert text.splitlines()[0] == "model: stories260K  (260K parameters, 1.0 MB in fp32)"
    assert "weights MB" in text and "peak RSS MB" in text and " 54.2 " in text
    assert "2.22x (noise: 0% accepted allows at most 1.00x)" in text
    assert (report.count_text(1_100_048_384), report.bytes_text(4.4e9), report.count_text(44_200_000)) == (
        "1.10B", "4.40 GB", "44.2M")
    # a speed-up inside its runs' own spread is marked; one outside it, and possible at its acceptance, is not
    spread = dict(rows[0], speedup=1.08, acceptance_rate=0.5, decode_tok_s=1080.0, decode_tok_s_min=1000.0,
                  decode_tok_s_max=1150.0, plain_decode_tok_s_min=950.0, plain_decode_tok_s_max=1050.0)
    assert report.speedup_noise(spread) == "within the runs' noise (±14%)"
    assert report.speedup_noise(dict(spread, speedup=1.6, decode_tok_s=1600.0, decode_tok_s_min=1550.0,
                                     decode_tok_s_max=1650.0)) is None
    assert report.speedup_noise(dict(rows[0], speedup=1.3, acceptance_rate=0.6)) == "one run: noise not measured"
