"""README.md and docs/*.md: every relative link resolves (file and #anchor), and the README stays short."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) outside code spans; an image link ![..](..) is a link too.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def _links(text: str) -> list[str]:
    return LINK.findall(CODE.sub("", text))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = CODE.sub(lambda m: m.group(0).strip("`"), heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_anchor(m.group(1)) for m in re.finditer(r"(?m)^#{1,6}\s+(.+?)\s*#*$", text)}


def test_the_link_checker_sees_links_and_anchors():
    assert _links("see [a](docs/x.md#y) and `[b](not/a/link.md)` and [c](https://e.org)") == [
        "docs/x.md#y", "https://e.org"
    ]  # fmt: skip
    assert _anchor("GPU and TPU") == "gpu-and-tpu"
    assert _anchor("The contract: `encode_request` / `score`") == "the-contract-encode_request--score"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_resolves(doc):
    bad = []
    for target in _links(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ... are not checked offline
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            bad.append(f"{target}: {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved} "
                       "does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            bad.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 10 * 1024, f"README.md is {len(text.encode())} bytes; move detail to docs/"
    head = text[:600]
    assert "make demo" in head and "make test" in head
