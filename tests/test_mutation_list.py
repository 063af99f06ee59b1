"""The planted-bug list (tests/mutation/run.py) stays in step with the code: every edit's text occurs exactly once
in its file, and each equivalent mutant says why (the full run takes ~30 minutes; this check takes a second)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_runner():
    spec = importlib.util.spec_from_file_location("mutation_run", REPO / "tests" / "mutation" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_exactly_once_and_changes_the_text():
    run = load_runner()
    stale = []
    for m in run.MUTANTS:
        text = (REPO / m.file).read_text()
        applicable = [(old, new) for old, new in m.edits() if text.count(old) == 1]
        if not applicable or applicable[0][0] == applicable[0][1]:
            stale.append(f"{m.id} ({m.file}): {m.old!r}")
    assert not stale, "update tests/mutation/run.py:\n" + "\n".join(stale)
    assert len({m.id for m in run.MUTANTS}) == len(run.MUTANTS)


def test_equivalent_mutants_exist_and_give_a_reason():
    run = load_runner()
    ids = {m.id for m in run.MUTANTS}
    assert set(run.EQUIVALENT) <= ids
    assert all(len(reason) > 40 for reason in run.EQUIVALENT.values())
