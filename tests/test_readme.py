"""The Python code blocks of README.md and docs/*.md run as written, so they stay true.

The convention (each file states it again in an HTML comment above its first block):

- every ```python block runs as written, offline, in a fresh namespace;
- a block whose first line is ``# continues the block above`` runs in the namespace the
  block before it left, so a chain of blocks reads as one program;
- a block whose first line is ``# not run: <reason>`` is only compiled, never run (it needs
  torchrun, a GPU or a download; say which).

Other fences (```bash, plain ``` for output) are not Python. A Python block is fenced with
exactly ```python: a fence such as ```py would silently escape these tests, so it fails them.
Blocks run with the Hugging Face hub offline; one that needs a missing optional dependency
(the ``hf`` extra) is skipped, naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
CONTINUES = "# continues the block above"
NOT_RUN = "# not run:"
FENCE = re.compile(r"^ {0,3}```\s*(\S*)\s*$")
PYTHON_LIKE = {"py", "python3", "pycon", "python3.11", "ipython"}
# What a block may import that growop itself does not need (the hf extra).
OPTIONAL = {"transformers", "tokenizers", "safetensors", "accelerate", "peft"}


@dataclass
class Block:
    path: Path
    line: int  # of the block's first code line in the file
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.code.lstrip("\n").splitlines()[0] if self.code.strip() else ""

    def compiled(self):
        # Padded with blank lines so that a traceback names the file's own line numbers.
        return compile("\n" * (self.line - 1) + self.code, str(self.path), "exec")


def blocks(path: Path) -> list[Block]:
    """Every fenced block of the file, with its language and first code line."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if FENCE.match(lines[j])), None)
        assert end is not None, f"{path.relative_to(ROOT)}:{i + 1}: a fence that never closes"
        found.append(Block(path, i + 2, opening.group(1).lower(), "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return found


def chains(path: Path) -> list[list[Block]]:
    """The file's runnable Python blocks, grouped into the chains that share a namespace."""
    grouped: list[list[Block]] = []
    for block in (b for b in blocks(path) if b.language == "python"):
        if block.first_line.startswith(NOT_RUN):
            continue
        if block.first_line.startswith(CONTINUES):
            grouped[-1].append(block)  # test_the_convention_holds checks there is one
        else:
            grouped.append([block])
    return grouped


CHAINS = [chain for path in DOCUMENTS for chain in chains(path)]


@pytest.mark.parametrize("path", DOCUMENTS, ids=[path.name for path in DOCUMENTS])
def test_the_convention_holds(path):
    text = path.read_text()
    found = blocks(path)
    if any(block.language == "python" for block in found):
        assert CONTINUES in text and NOT_RUN in text, f"{path.name}: state the convention where writers look"
    previous = None
    for block in found:
        assert block.language not in PYTHON_LIKE, f"{block.where}: fence Python with ```python"
        if block.language != "python":
            continue
        if block.first_line.startswith(NOT_RUN):
            assert block.first_line[len(NOT_RUN):].strip(), f"{block.where}: say why it is not run"
        if block.first_line.startswith(CONTINUES):
            assert previous is not None and not previous.first_line.startswith(NOT_RUN), (
                f"{block.where} continues a block that does not run"
            )
        block.compiled()  # every Python block is at least valid Python, run or not
        previous = block


def test_the_readme_and_the_docs_have_runnable_blocks():
    """The chains come from README.md and from docs/ (a glob that matched nothing would
    leave docs/*.md untested without a failure)."""
    assert {chain[0].path for chain in CHAINS} >= {README, ROOT / "docs" / "integrations.md"}


@pytest.mark.parametrize("chain", CHAINS, ids=[f"{chain[0].path.name}:line{chain[0].line}" for chain in CHAINS])
def test_block_runs(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    namespace = {"__name__": "__readme__"}
    for block in chain:
        try:
            exec(block.compiled(), namespace)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] in OPTIONAL:
                pytest.skip(f"{block.where} needs {error.name} (pip install \"growop[hf]\")")
            raise
