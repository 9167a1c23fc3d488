"""Regenerate the measured figures quoted in README.md and docs/benchmarks.md.

Each section runs the command that measures it and writes its table between the markers
``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->`` (in every page that has them),
stamped with the date and the machine; the figures go to ``docs/images``.

    python benchmarks/readme_figures.py                      # every section (~10 minutes on 2 cores)
    python benchmarks/readme_figures.py --only demo,mdeq     # some of them

Run it on a quiet machine (`uptime`: load well below the number of cores): the tables
report times.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "torch.md", ROOT / "docs" / "jax.md"]
IMAGES = ROOT / "docs" / "images"
SECTIONS = ("demo", "digits", "mdeq", "transformer", "hyperparameter", "floor", "torchdeq", "jaxopt")


def machine() -> str:
    versions = []
    for name in ("torch", "jax"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    from implicit_demo.threads import usable_cores

    cores = usable_cores()
    return f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.system()}, {cores} CPU cores, " \
           f"Python {platform.python_version()}, " + ", ".join(versions)


def demo_table() -> str:
    from implicit_core import available_backends
    from implicit_demo.demo import run_demo
    from implicit_demo.model import DemoConfig

    lines = ["| backend | test accuracy | time per epoch (median) | forward / backward per epoch | first epoch |",
             "|---|---|---|---|---|"]
    for backend in [b for b in ("numpy", "torch", "jax") if b in available_backends()]:
        result = run_demo(DemoConfig(backend=backend), out=IMAGES, show_progress=False, echo=lambda *_: None)
        forward, backward = result.split()
        lines.append(f"| {backend} | {100 * result.test_accuracy:.1f} % | {result.epoch_time():.2f} s | "
                     f"{forward:.2f} s / {backward:.2f} s | {result.history[0].epoch_s:.2f} s |")
        (IMAGES / f"demo_{backend}.json").unlink(missing_ok=True)  # the PNG is the figure; the JSON is not kept
        if backend != "torch":
            (IMAGES / f"demo_{backend}.png").unlink(missing_ok=True)
    return "\n".join(lines)


def digits_table() -> str:
    from implicit_core import available_backends
    from implicit_demo.compare import run_comparison, to_markdown

    backends = [b for b in ("torch", "jax", "numpy") if b in available_backends()]
    rows = run_comparison(backends, out=IMAGES, show_progress=False, echo=lambda *_: None)
    for name in ("compare.csv", "compare.md"):
        (IMAGES / name).unlink(missing_ok=True)
    return to_markdown(rows)


def workload_table(name: str) -> str:
    from implicit_demo.workloads import run_workload

    captured: list[str] = []
    run_workload(name, ("ift", "jfb", "phantom", "shine", "broyden_reuse"), out=IMAGES, show_progress=False,
                 echo=captured.append)
    for suffix in (".csv", ".md"):
        (IMAGES / f"compare_{name}{suffix}").unlink(missing_ok=True)
    return "\n".join(text for text in captured if not text.startswith("\nwritten")).strip()


def floor_table() -> str:
    """``benchmarks/floor.py`` on every backend and solver, with TorchDEQ and jaxopt where installed."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import floor

    backends = [b for b in floor.BACKENDS if importlib.util.find_spec(b) is not None]
    peers = all(importlib.util.find_spec(m) is not None for m in ("torchdeq", "jaxopt"))
    rows = floor.measure_all(backends, floor.SOLVERS, 256, 512, 15, peers, echo=lambda *_: None)
    from implicit_demo.threads import default_threads

    return f"{floor.title(256, 512, 15)}, {default_threads()} thread(s)\n\n{floor.table(rows, peers)}"


def peer_table(name: str) -> str:
    """``benchmarks/torch_vs_torchdeq.py`` (``torchdeq``) or ``jax_vs_optimistix_jaxopt.py`` (``jaxopt``), CPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if name == "torchdeq":
        import torch_vs_torchdeq as peer
    else:
        import jax_vs_optimistix_jaxopt as peer
    title, body = peer.measure_table(echo=lambda *_: None)
    return f"{title}\n\n{body}"


def substitute(name: str, body: str) -> None:
    pattern = re.compile(rf"(<!-- figures:{name} -->\n).*?(<!-- /figures:{name} -->)", re.S)
    for page in PAGES:
        text = page.read_text()
        if pattern.search(text):
            page.write_text(pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated sections (default: all of {', '.join(SECTIONS)})")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    from implicit_demo.threads import default_threads, limit_threads

    limit_threads(default_threads())
    stamp = f"*Measured {machine()}; regenerate with `python benchmarks/readme_figures.py --only SECTION`.*"
    for name in chosen:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        measure = {"demo": demo_table, "digits": digits_table, "floor": floor_table,
                   "torchdeq": lambda: peer_table("torchdeq"), "jaxopt": lambda: peer_table("jaxopt")}
        table = measure.get(name, lambda: workload_table(name))()
        substitute(name, f"{stamp}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
