"""engine.text.stopping.StopStringFilter against a brute-force reference: whatever way the text is split into pieces,
what it releases is exactly the text before the first stop string, never any part of a stop string, and nothing
that could still turn out to start one is released early."""
from __future__ import annotations

import random

import pytest

from engine.text.stopping import StopStringFilter


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the earliest occurrence of any (non-empty) stop string, and whether there was one."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def run(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """Feed the pieces until a stop; flush at the end of the stream. Returns (released parts, stopped)."""
    f = StopStringFilter(stops)
    out = []
    for piece in pieces:
        text, hit = f.push(piece)
        out.append(text)
        if hit:
            return out, True
    out.append(f.flush())
    return out, False


@pytest.mark.parametrize("seed", range(40))
def test_random_splits_equal_the_reference(seed):
    rng = random.Random(seed)
    stops = [rng.choice(["ab", "bca", "aab", "  ", "c", "abcab", "b a"]) for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 40)))
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    released, stopped = run(pieces, stops)
    expected, should_stop = reference(text, stops)
    assert ("".join(released), stopped) == (expected, should_stop), (pieces, stops)
    # released so far is always a prefix of the answer: nothing is taken back, nothing of a stop string leaks
    so_far = ""
    for part in released:
        so_far += part
        assert expected.startswith(so_far)


def test_a_split_stop_string_is_held_back_until_decided():
    f = StopStringFilter(["aab"])
    assert f.push("xaa") == ("x", False)  # "aa" may start "aab": held (the longest such suffix)
    assert f.push("b") == ("", True)  # completed: the held text is dropped with it
    f = StopStringFilter(["aab"])
    assert f.push("xaa") == ("x", False)
    assert f.push("c") == ("aac", False)  # not a stop string after all: released
    f = StopStringFilter(["abc"])
    assert f.push("xab") == ("x", False)  # a suffix of the text, not a prefix of it, is what may start a stop


def test_the_earliest_stop_string_wins():
    assert StopStringFilter(["cd", "b"]).push("abcde") == ("a", True)
    assert StopStringFilter(["b", "cd"]).push("abcde") == ("a", True)


def test_empty_stop_strings_are_ignored_and_flush_releases_the_held_text():
    f = StopStringFilter(["", "xyz"])
    assert f.push("abc") == ("abc", False)
    assert f.push("xy") == ("", False)
    assert f.flush() == "xy"  # the stream ended without the stop string: the held text is part of the output
    assert f.flush() == ""
    assert StopStringFilter([""]).push("anything") == ("anything", False)
    assert StopStringFilter().push("as is") == ("as is", False)
