"""`tinyllama inspect ...` run as a user would (`python -m engine` in a subprocess): every subcommand's JSON against
transformers or the Python API it prints, every PNG a valid PNG of the documented size, one-line errors."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_reference
from tests.test_cli import one_line_error, tinyllama

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking the signature and decoding every pixel."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    with Image.open(path) as image:
        image.load()  # raises on a truncated or corrupt file
        assert image.size == (width, height)
    return width, height


def run_json(*args, stdin=None) -> dict:
    p = tinyllama("inspect", *args, "--json", stdin=stdin)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_tokens_of_tinyllama_tokenizer_without_weights(tinyllama_tokenizer_dir):
    from transformers import AutoTokenizer

    out = run_json("tokens", "--model", str(tinyllama_tokenizer_dir), "Hello\n world 🙂")
    pieces = [t["piece"] for t in out["tokens"]]
    assert pieces == AutoTokenizer.from_pretrained(tinyllama_tokenizer_dir).convert_ids_to_tokens(out["token_ids"])
    assert pieces[:4] == ["<s>", "▁Hello", "<0x0A>", "▁world"]
    assert out["tokens"][2]["bytes"] == [10] and out["tokens"][0]["special"] and not out["tokens"][1]["special"]
    chat = run_json("tokens", "--model", str(tinyllama_tokenizer_dir), "--chat", "--system", "Be brief.", "Hi")
    assert [t["piece"] for t in chat["tokens"] if t["special"]] == ["<s>", "</s>", "</s>"]
    p = tinyllama("inspect", "tokens", "--model", str(tinyllama_tokenizer_dir), "Hello\n world")
    assert p.returncode == 0 and "<0x0A>" in p.stdout and "'\\n'" in p.stdout and "(special)" in p.stdout


def test_next_equals_transformers_softmax(stories260k):
    import torch

    out = run_json("next", "--model", str(stories260k), "--k", "5", "--temperature", "0.8", "--top-p", "0.9",
                   "Once upon a time")
    with torch.no_grad():
        logits = load_reference(stories260k)(torch.tensor([out["prompt_token_ids"]])).logits[0, -1].double()
    probs = torch.softmax(logits, -1).numpy()
    assert [c["token_id"] for c in out["candidates"]] == torch.argsort(logits, descending=True)[:5].tolist()
    assert all(abs(c["probability"] - probs[c["token_id"]]) < 1e-5 for c in out["candidates"])
    assert out["sampling"]["temperature"] == 0.8 and out["sampling"]["top_p"] == 0.9
    assert abs(sum(c["sampled_probability"] for c in out["candidates"]) - 1) < 1e-6  # top-p keeps few: all shown


def test_perplexity_of_a_file_with_worst_tokens(stories260k, tmp_path):
    from engine.inspect.perplexity import perplexity
    from engine.model import load_model

    text = STORY + " One day, she saw a big, red ball."
    (tmp_path / "story.txt").write_text(text)
    out = run_json("perplexity", "--model", str(stories260k), "--window", "16", "--stride", "8", "--worst", "3",
                   str(tmp_path / "story.txt"))
    expected = perplexity(load_model(str(stories260k)), text, window=16, stride=8, progress=False)
    assert out["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)
    assert [w["position"] for w in out["worst"]] == expected.worst(3) and len(out["windows"]) == len(expected.windows)
    assert out["scored_tokens"] == out["tokens"] - 1 and out["window"] == 16 and out["stride"] == 8
    p = tinyllama("inspect", "perplexity", "--model", str(stories260k), "--worst", "2", "-", stdin=text)
    assert p.returncode == 0 and "perplexity:" in p.stdout and "least expected" in p.stdout


def test_attention_pngs(stories260k, tmp_path):
    from engine.inspect.attention import head_summary
    from engine.model import load_model

    out = run_json("attention", "--model", str(stories260k), "--layer", "1", "--head", "3", "--out",
                   str(tmp_path / "maps"), STORY)
    files = [Path(f) for f in out["files"]]
    assert [f.name for f in files] == ["layer1.png", "layer1-head3.png", "heads.png"]
    # the documented sizes (engine/inspect/plots.py, docs/inspection.md): stories260K has 8 heads, 4 KV heads (2 per group)
    assert [png_size(f) for f in files] == [(900, 4 * 240 + 130), (1000, 900), (1800, 650)]
    model = load_model(str(stories260k))
    trace = model.trace(out["token_ids"], attentions=True)
    assert np.max(np.abs(np.array(out["attention"]) - trace.attentions[1][3])) < 1e-7
    assert np.allclose(out["summary"]["to_previous"], head_summary(model, out["token_ids"]).to_previous)


def test_lens_png_and_table(stories260k, tmp_path):
    out = run_json("lens", "--model", str(stories260k), "--out", str(tmp_path / "lens.png"), STORY)
    t = len(out["token_ids"])
    assert len(out["top_ids"]) == 6 and len(out["top_ids"][0]) == t and out["rows"][0] == "embeddings"
    assert png_size(tmp_path / "lens.png") == (150 + 30 + 84 * t, 140 + 170 + 30 * 6)
    p = tinyllama("inspect", "lens", "--model", str(stories260k), "Once upon a time")
    assert p.returncode == 0 and "▁upon" in p.stdout


def test_neighbours(stories260k):
    out = run_json("neighbours", "--model", str(stories260k), "--k", "4", "Lily")
    assert out["piece"] == "▁Lily" and [n["rank"] for n in out["neighbours"]] == [1, 2, 3, 4]
    assert out["neighbours"][0]["cosine"] >= out["neighbours"][-1]["cosine"]
    by_id = run_json("neighbours", "--model", str(stories260k), "--k", "4", "--id", str(out["token_id"]))
    assert by_id["neighbours"] == out["neighbours"]


@pytest.mark.parametrize("args,message", [
    (["attention", "--layer", "9", "--out", "x", "Hi"], "--layer 9 is out of range"),
    (["attention", "--layer", "0", "--head", "8", "--out", "x", "Hi"], "--head 8 is out of range"),
    (["neighbours", "Lily played"], "is 3 tokens"),
    (["neighbours", "--id", "x"], "not a token id"),
    (["next", "--k", "0", "Hi"], "--k must be >= 1"),
    (["next", "--top-p", "2", "Hi"], "top_p"),
    (["perplexity", "--window", "1", "Hi there"], "window"),
    (["lens", "--out", "lens.jpg", "Hi"], ".png"),
    (["tokens", "--system", "x", "Hi"], "--system needs --chat"),
])
def test_user_errors_are_one_line(stories260k, args, message):
    p = tinyllama("inspect", args[0], "--model", str(stories260k), *args[1:])
    assert message in one_line_error(p)
