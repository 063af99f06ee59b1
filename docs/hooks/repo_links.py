"""MkDocs hooks: one set of Markdown files that reads right on GitHub and builds as a site.

The pages link the way GitHub renders the repository: README.md links `docs/gguf.md`, a docs/ page links
`../bench/results/x.json` or `../README.md`. MkDocs only knows files under docs/, so these hooks

- make the repository's README.md the site's home page (`index.md`);
- add every file outside docs/ that a page links to (a results file, a picture, bench/README.md) to the site under
  `repo/<its path>`, following links from the Markdown files so added in turn;
- rewrite each such link to the file's place in the site, so MkDocs checks it like any other (strict mode fails on a
  link whose file is missing: the link is left as written and MkDocs reports it);
- give headings GitHub's anchors (`## The web page` -> `#the-web-page`), so an anchor works on both.
"""
from __future__ import annotations

import os
import posixpath
import re
import unicodedata
from urllib.parse import unquote, urlsplit

from mkdocs.structure.files import File, Files, InclusionLevel

SITE_PREFIX = "repo"  # where files from outside docs/ land in the site
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,}).*?^\1\2[ \t]*$", re.M | re.S)  # a fenced code block
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)  # an inline code span
LINK_TARGET = re.compile(r"\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")  # the `](target "title")` of a link
HTML_SRC = re.compile(r"<img\b[^>]*?\bsrc=\"(?P<target>[^\"]+)\"")


def github_slug(value: str, separator: str = "-") -> str:
    """A heading's text -> GitHub's anchor for it: lower case, punctuation dropped, each space a hyphen."""
    value = unicodedata.normalize("NFKC", value).strip().lower()
    value = "".join(c for c in value if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return value.replace(" ", separator)


def _prose_pieces(markdown: str):
    """Yield (text, is_prose) pieces of `markdown`; code blocks and code spans are not prose (their links are text)."""
    at = 0
    for fence in FENCE.finditer(markdown):
        yield from _spans(markdown[at:fence.start()])
        yield fence.group(0), False
        at = fence.end()
    yield from _spans(markdown[at:])


def _spans(text: str):
    at = 0
    for span in CODE_SPAN.finditer(text):
        yield text[at:span.start()], True
        yield span.group(0), False
        at = span.end()
    yield text[at:], True


def _relative_targets(markdown: str):
    """Every relative link or image target in the prose of `markdown` (no scheme, not only an anchor)."""
    for piece, prose in _prose_pieces(markdown):
        if prose:
            for pattern in (LINK_TARGET, HTML_SRC):
                for match in pattern.finditer(piece):
                    parts = urlsplit(match.group("target"))
                    if not parts.scheme and not parts.netloc and parts.path and not parts.path.startswith("/"):
                        yield match.group("target")


class RepoSite:
    """The map between files of the repository and their place in the site."""

    def __init__(self, config):
        self.repo = os.path.dirname(os.path.abspath(config.config_file_path))
        self.docs = os.path.abspath(config.docs_dir)
        self.site_uri: dict[str, str] = {}  # absolute path of a file -> its src_uri in the site

    def resolve(self, source: str, target: str) -> str:
        """The absolute path a relative link `target` in the file `source` points at (query and anchor dropped)."""
        path = unquote(urlsplit(target).path)
        return os.path.normpath(os.path.join(os.path.dirname(source), path))

    def outside_uri(self, path: str) -> str | None:
        """The site's src_uri for a file of the repository outside docs/, or None when `path` is not one."""
        if not os.path.isfile(path) or os.path.commonpath([path, self.repo]) != self.repo:
            return None
        if os.path.commonpath([path, self.docs]) == self.docs:
            return None
        return posixpath.join(SITE_PREFIX, *os.path.relpath(path, self.repo).split(os.sep))


_site: RepoSite | None = None


def on_config(config):
    """Headings get GitHub's anchors."""
    global _site
    _site = RepoSite(config)
    config.mdx_configs.setdefault("toc", {})["slugify"] = github_slug
    return config


def on_files(files: Files, config) -> Files:
    """README.md becomes the home page; files outside docs/ that the pages link to are added under repo/."""
    site = _site
    if files.get_file_from_path("index.md") is None:
        files.append(File.generated(config, "index.md", abs_src_path=os.path.join(site.repo, "README.md")))
    for file in files:
        if file.abs_src_path:
            site.site_uri[os.path.abspath(file.abs_src_path)] = file.src_uri
    queue = [f.abs_src_path for f in files if f.is_documentation_page() and f.abs_src_path]
    while queue:
        source = queue.pop()
        with open(source, encoding="utf-8") as handle:
            markdown = handle.read()
        for target in _relative_targets(markdown):
            path = site.resolve(source, target)
            uri = site.outside_uri(path)
            if uri is None or path in site.site_uri:
                continue
            site.site_uri[path] = uri
            files.append(File.generated(config, uri, abs_src_path=path, inclusion=InclusionLevel.NOT_IN_NAV))
            if path.endswith(".md"):
                queue.append(path)
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Each link to a file outside docs/ (or from the README into docs/) points at the file's place in the site."""
    site = _site
    source = os.path.abspath(page.file.abs_src_path) if page.file.abs_src_path else None
    if source is None:
        return markdown
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match) -> str:
        target = match.group("target")
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or not parts.path or parts.path.startswith("/"):
            return match.group(0)
        uri = site.site_uri.get(site.resolve(source, target))
        if uri is None:
            return match.group(0)  # not a file we know: left for MkDocs to check (and report)
        new = posixpath.relpath(uri, here or ".") + (f"#{parts.fragment}" if parts.fragment else "")
        return match.group(0).replace(target, new, 1)

    out = []
    for piece, prose in _prose_pieces(markdown):
        if prose:
            piece = LINK_TARGET.sub(rewrite, piece)
            piece = HTML_SRC.sub(rewrite, piece)
        out.append(piece)
    return "".join(out)
