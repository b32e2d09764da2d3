"""The links of the project's Markdown files, and the anchors GitHub gives their headings.

GitHub's heading ids (github-slugger): the rendered text lowercased, every character that is not a
letter, digit, `_`, `-` or space dropped, spaces turned into `-`; a repeated id gets `-1`, `-2`.
Rendered text means inline markup gone: backticks, emphasis and link syntax (its label stays).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`[^`]*`")


def markdown_files() -> list[Path]:
    """README.md and the other top-level pages, and everything under docs/."""
    return sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").rglob("*.md"))


def _prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, where links and headings are markup."""
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    text = _LINK.sub(r"\1", heading).replace("`", "")
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> list[str]:
    """The ids of the file's headings, in order, as GitHub numbers repeats."""
    seen: dict[str, int] = {}
    ids = []
    for _, line in _prose_lines(path.read_text()):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        ids.append(base if count == 0 else f"{base}-{count}")
    return ids


@dataclass(frozen=True)
class Link:
    source: Path
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.source.relative_to(ROOT)}:{self.line}: {self.target}"


def relative_links(path: Path) -> Iterator[Link]:
    """Every link of the file that stays inside the repository (no scheme)."""
    for number, line in _prose_lines(path.read_text()):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            target = match.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            yield Link(path, number, target)


def broken(link: Link) -> str | None:
    """Why the link leads nowhere, or None when its file (and heading) exist."""
    file_part, _, anchor = link.target.partition("#")
    target = (link.source.parent / file_part).resolve() if file_part else link.source
    if not target.exists():
        return f"no file {file_part}"
    if ROOT not in target.parents and target != ROOT:
        return f"{file_part} is outside the repository"
    if anchor:
        if target.suffix != ".md":
            return f"an anchor into {file_part}, which is not Markdown"
        if anchor not in anchors(target):
            return f"no heading #{anchor} in {target.relative_to(ROOT)}"
    return None
