"""Every ```python block of the README and of the documentation site runs as written, each in
a fresh interpreter (blocks inside tabs are indented: they run dedented)."""

import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page, textwrap.dedent(code))
          for page in PAGES for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


def test_the_readme_and_the_docs_have_python_blocks():
    assert sum(page.name == "README.md" for page, _ in BLOCKS) >= 2
    assert len(BLOCKS) >= 12


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"{page.stem}-{i}" for i, (page, _) in enumerate(BLOCKS)])
def test_documented_block_runs(index):
    page, code = BLOCKS[index]
    needs = [name for name in ("torch", "jax", "cupy") if re.search(rf"^\s*(import|from) {name}\b", code, re.M)]
    for name in needs:
        if name != "cupy":  # the CuPy block checks availability itself
            pytest.importorskip(name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, f"{page.name} block failed:\n{code}\n{out.stderr[-3000:]}"


def test_the_docs_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: every page, link and API-reference entry resolves."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("doc-heading") > 50
