"""`python -m bench.soak` (issue 34's soak: ordinary streams beside a hostile load) end to end, short, on a tiny model:
it runs every phase, the server survives, and the report has its figures (timings here mean nothing)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("httpx")


def test_a_short_soak_runs_every_phase_and_reports(tiny_chat_model, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.soak", "--quick", "--model", str(tiny_chat_model),
                        "--duration", "4", "--warmup", "1", "--hostile", "3", "--threads", "1",
                        "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    s = results["summary"]
    assert s["crashes"] == 0 and s["server_errors"] == 0 and s["ordinary_errors"] == 0
    for phase in ("baseline", "hostile"):
        assert results[phase]["gaps"] > 10 and 0 < results[phase]["gap_p50_s"] <= results[phase]["gap_p99_s"]
    outcomes = {status for counts in results["hostile"]["hostile"].values() for status in counts}
    assert outcomes and outcomes <= {"200", "400", "413", "503", "left", "unfinished"}, results["hostile"]["hostile"]
    assert sum(sum(c.values()) for c in results["hostile"]["hostile"].values()) >= 3
    assert results["rss_before_bytes"] > 20e6 and results["rss_after_bytes"] > 20e6
    assert results["machine"]["kernel_variant"] and results["date"]
    for text in ("baseline: gap p50", "hostile:  gap p50", "p99 ratio", "RSS at the hostile phase's start"):
        assert text in r.stdout
