import subprocess
import sys

from implicit_core.cli import main


def test_plugins_lists_every_kind(capsys):
    assert main(["plugins", "--plain"]) == 0
    out = capsys.readouterr().out
    for name in ("numpy", "cupy", "anderson", "broyden", "fixed_point", "ift", "jfb", "phantom", "shine", "broyden_reuse"):
        assert name in out
    assert "implicit-core" in out


def test_console_script_runs_without_a_terminal():
    out = subprocess.run([sys.executable, "-m", "implicit_core.cli", "plugins"], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0].split()[:4] == ["kind", "name", "source", "status"]


def test_unknown_command_exits_non_zero():
    proc = subprocess.run([sys.executable, "-m", "implicit_core.cli", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode != 0 and "invalid choice" in proc.stderr
