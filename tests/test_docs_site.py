"""The documentation holds together: the site builds with `mkdocs build --strict` (a broken link or anchor, a missing
page or a page left out of the nav fails it), every docs/*.md page is in the nav, every relative link of the README
and of the pages reaches a file of the repository (and a heading, where it names one), the README stays a front page
(at most 200 lines), and the tour on it runs as written on the bundled model."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from tests.conftest import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"


def load_hooks():
    """docs/hooks/repo_links.py, the site's hooks: its link finder and GitHub's heading anchors."""
    spec = importlib.util.spec_from_file_location("repo_links", DOCS / "hooks" / "repo_links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


def nav_pages(nav) -> list[str]:
    """Every file named in mkdocs.yml's nav (nested sections included)."""
    found = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        found += nav_pages(value) if isinstance(value, list) else [value]
    return found


def docs_pages() -> set[str]:
    return {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts}


def anchors(markdown_file: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (code blocks left out)."""
    prose = "".join(piece for piece, is_prose in hooks._prose_pieces(markdown_file.read_text(encoding="utf-8"))
                    if is_prose or not piece.lstrip().startswith(("```", "~~~")))
    return {hooks.github_slug(m.group(1).strip()) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", prose, re.M)}


def test_the_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    site = tmp_path / "site"
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "Set-up: two commands" in home  # the README is the home page
    for page in docs_pages():  # every page was rendered (use_directory_urls: name/index.html)
        assert (site / page.removesuffix(".md") / "index.html").is_file(), page
    # a file outside docs/ that a page links to is in the site, where the rewritten link points
    assert (site / "repo" / "bench" / "results" / "interleave-bf16-epyc-2core.json").is_file()
    assert 'href="repo/bench/results/interleave-bf16-epyc-2core.json"' not in home  # the README links docs, not this
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert 'href="../repo/bench/results/interleave-bf16-epyc-2core.json"' in benchmarks


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = nav_pages(config["nav"])
    assert len(listed) == len(set(listed)), "a page is listed twice in the nav"
    assert "index.md" in listed  # the README, as the home page
    assert set(listed) - {"index.md"} == docs_pages()


@pytest.mark.parametrize("source", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_reaches_a_file_and_its_heading(source):
    """As GitHub renders the repository: each relative link (or image) names a file that exists, and an anchor a
    heading of that file. The site build checks the same in its own terms; this one needs no MkDocs and says where."""
    broken = []
    for target in hooks._relative_targets(source.read_text(encoding="utf-8")):
        parts = urlsplit(target)
        path = (source.parent / unquote(parts.path)).resolve()
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif REPO.resolve() not in path.parents:
            broken.append(f"{target}: outside the repository")
        elif parts.fragment and path.suffix == ".md" and parts.fragment not in anchors(path):
            broken.append(f"{target}: no heading #{parts.fragment} in {path.relative_to(REPO.resolve())}")
    for anchor in re.findall(r"\]\(#([^)\s]+)\)", source.read_text(encoding="utf-8")):
        if anchor not in anchors(source):
            broken.append(f"#{anchor}: no such heading here")
    assert not broken, broken


def test_github_anchors():
    """The anchors the hooks give MkDocs' headings are GitHub's, so one link works in both."""
    assert hooks.github_slug("The web page") == "the-web-page"
    assert hooks.github_slug("`python -m bench.serve`: the server's load benchmark") == \
        "python--m-benchserve-the-servers-load-benchmark"
    assert hooks.github_slug("Batch-1 decode, A/B in one process") == "batch-1-decode-ab-in-one-process"
    assert hooks.github_slug("Quantized weights (int8, int4)") == "quantized-weights-int8-int4"


def test_the_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    # the two set-up commands; the test command is exactly what CI runs
    assert "    pip install . && tinyllama chat\n" in text
    assert "    pip install -e '.[test]' && python -m pytest\n" in text
    assert "pip install -q -e '.[test]' && python -m pytest\n" in (REPO / ".ci" / "run").read_text()
    for page in docs_pages():  # every page is reachable from the front page
        assert f"(docs/{page})" in text, f"docs/{page}: add it to the README's Documentation list"



def tour() -> list[str]:
    """The command lines of the README's tour."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## A ten-line tour\n\n((?:    .*\n)+)", text)
    assert block, "README lost its tour"
    return [line.strip() for line in block.group(1).splitlines()]


def test_the_tour_has_ten_lines_and_each_command():
    lines = tour()
    assert len(lines) == 10
    for command in ("chat", "generate", "serve", "check", "bench", "inspect"):
        assert any(re.match(rf"tinyllama {command}\b", line) for line in lines), command


def test_the_tour_runs_on_the_bundled_model(stories260k, tmp_path):
    """Each line of the tour that runs on stories260K alone (no network, no server, no transformers) runs as
    written, from a folder where ../shared/models/stories260K is the bundled model: generate, inspect, the Python
    line, and chat with the template the README names (stdin a pipe: one message, one reply)."""
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "models").mkdir()
    (tmp_path / "shared" / "models" / "stories260K").symlink_to(stories260k, target_is_directory=True)
    ran = []
    for line in tour():
        words = shlex.split(line.split("  #")[0])
        if "../shared/models/stories260K" not in line or words[:2] == ["tinyllama", "serve"] or \
                words[:2] == ["tinyllama", "check"]:
            continue  # the server: tests/test_web_page.py (a new user's first reply); check: tests/test_compare.py
        command = [sys.executable, "-m", "engine", *words[1:]] if words[0] == "tinyllama" else \
            [sys.executable, *words[1:]]
        done = subprocess.run(command, cwd=work, input="Hello!\n", capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, (line, done.stderr)
        assert done.stdout.strip(), line
        ran.append(words[1] if words[0] == "tinyllama" else "python")
    assert (work / "lens.png").stat().st_size > 10_000
    assert sorted(set(ran)) == ["chat", "generate", "inspect", "python"]

