"""What the model-building scripts beside this file share: they run as plain scripts in the
engine venv (torch, transformers), so this is imported by its bare name, not from the package.

`build_once` makes building idempotent and crash-safe: an OUT_DIR that already holds a complete
model is left alone, and the model is built in a temporary sibling folder and renamed into place,
so a crash never leaves half a model.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

STEP_PREFIX = "step: "  # models.py's spinner shows the text after it


def step(text: str) -> None:
    """Say what the build is at, as one stdout line models.prepare reads while it runs."""
    print(f"{STEP_PREFIX}{text}", flush=True)


def is_complete(folder: Path, required_files: Iterable[str]) -> bool:
    return all((folder / name).is_file() for name in required_files)


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    The packages that ship our weights and tokenizer ranks are installed with --no-deps, so
    importing them would fail; find_spec only locates them.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed in {sys.prefix}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise SystemExit(f"{path} is missing: is the PyPI package {package!r} complete?")
    return path


def build_once(out: Path, required_files: Iterable[str], build: Callable[[Path], None]) -> None:
    """Run `build(tmp)` and move its folder to `out`, unless `out` already holds the model."""
    required_files = tuple(required_files)
    if is_complete(out, required_files):
        return
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists but holds no complete model; remove it and retry")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is not secret
    try:
        build(tmp)
        step("moving into place")
        # transformers writes the safetensors 0600; an engine may run as another user.
        for file in tmp.iterdir():
            file.chmod(0o644)
        try:
            tmp.rename(out)  # atomic; replaces an empty OUT_DIR, fails on a non-empty one
        except OSError:
            if not is_complete(out, required_files):  # a concurrent build finished first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(required_files: Iterable[str], build: Callable[[Path], None]) -> None:
    """The scripts' command line: `python SCRIPT.py OUT_DIR`; prints OUT_DIR when done."""
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUT_DIR")
    out = Path(sys.argv[1]).expanduser().absolute()
    build_once(out, required_files, build)
    print(out)
