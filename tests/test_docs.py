"""The documentation cannot go stale: every ```python block of docs/**/*.md and README.md runs here.

The blocks of one page run in order in one namespace (a later block may use what an earlier one built), in
a fresh temporary working directory, with torch's generator seeded. A failure names the file and the line
of the block's opening fence, and the traceback's frames carry the page's own line numbers. Blocks that
cannot run on a CPU in seconds are written in another language (```bash for shell) or sized down on the
page itself; nothing is skipped here.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
# Pages whose blocks need a newer torch than the floor (the lowest-versions CI job skips them, as the suite
# skips the same features there): torch.compile(fullgraph=True) of the roots, torch.export and ONNX.
NEEDS_TORCH = {"docs/root/methods.md": (2, 12), "docs/deployment.md": (2, 11)}
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)[^`]*$")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the opening fence, source) of every ```python block of a Markdown file, in order."""
    blocks: list[tuple[int, str]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].lower()
        start, body = i + 1, []
        i += 1
        while i < len(lines):
            closing = lines[i].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{start}: code fence never closed")
        if info == "python":
            blocks.append((start, "\n".join(body) + "\n"))
        i += 1
    return blocks


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


PAGES_WITH_CODE = [page for page in pages() if python_blocks(page)]


def test_python_blocks_found():
    """The fence parser finds the pages' code: README's usage and the getting-started recipe at least."""
    names = {page.relative_to(ROOT).as_posix() for page in PAGES_WITH_CODE}
    assert {"README.md", "docs/getting-started.md"} <= names, names


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    name = page.relative_to(ROOT).as_posix()
    if TORCH_VERSION < NEEDS_TORCH.get(name, (0, 0)):
        pytest.skip(f"{name} needs torch >= {'.'.join(map(str, NEEDS_TORCH[name]))}")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "docs_page_" + re.sub(r"\W", "_", name)}
    for line, source in python_blocks(page):
        # Pad with blank lines so that tracebacks give the line numbers of the Markdown file.
        code = compile("\n" * line + source, filename=name, mode="exec")
        try:
            exec(code, namespace)
        except Exception:  # any failure of a documented block fails the page, naming its place
            pytest.fail(
                f"{name}:{line}: the ```python block opened at this line failed:\n{traceback.format_exc()}",
                pytrace=False,
            )


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


def test_every_page_is_in_the_nav():
    """mkdocs --strict warns on pages left out of the nav only when it builds; this says so in the suite."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").rglob("*.md")):
        relative = page.relative_to(ROOT / "docs").as_posix()
        assert f" {relative}" in nav, f"docs/{relative} is not in mkdocs.yml's nav"
