"""Every ```python block of the README runs as written, each in a fresh interpreter."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    code = BLOCKS[index]
    needs = [name for name in ("torch", "jax") if re.search(rf"^\s*(import|from) {name}\b", code, re.M)]
    for name in needs:
        pytest.importorskip(name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=README.parent)
    assert out.returncode == 0, f"README block {index} failed:\n{code}\n{out.stderr[-3000:]}"
