"""The fenced code blocks of README.md and docs/*.md, each named by its file and a hash of its text, for
tests/test_docs_examples.py (which keeps the checked list in tests/docs_examples.toml)."""

from __future__ import annotations

import hashlib
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    lang: str
    text: str  # dedented, without the fences

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    @property
    def first(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    def entry(self) -> str:
        """A TOML entry to paste into tests/docs_examples.toml (then set run / skip)."""
        first = self.first.replace("\\", "\\\\").replace('"', '\\"')[:100]
        return (f'[[block]]\nfile = "{self.file}"\nsha = "{self.sha}"\nfirst = "{first}"\n'
                'skip = "WHY IT CANNOT RUN HERE"\n')


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    found, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, start = opening["fence"], i
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            i += 1
        text = textwrap.dedent("\n".join(lines[start + 1:i])) + "\n"
        found.append(Block(str(path.relative_to(REPO)), start + 1, opening["lang"], text))
        i += 1
    return found


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in blocks(path)]
