"""Install the engine venv early, while scripts/up is still installing qwenstack's own venv.

    python3 src/qwenstack/engine/bootstrap.py [the flags given to `qwenstack up`]

Both installs wait mostly on downloads, unpacking and disk, so on a fresh machine running them
side by side shortens the time to the first answer (benchmarks/RESULTS.md). This runs with the
system Python, before qwenstack's dependencies exist: it loads engine/venv.py without the
engine package's __init__ (which needs pydantic). `qwenstack up`, started meanwhile, waits for
it on the install's lock and then finds the venv ready; if this failed, `up` installs again and
reports the error.

It installs only when `qwenstack up` would certainly use the same venv: with a settings file
(--config, QWENSTACK_CONFIG) or remote engines it does nothing, and `up` installs as before.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

ENGINE = Path(__file__).resolve().parent
SRC = ENGINE.parent.parent
# Settings that may name another venv or need none: left to `qwenstack up` to read.
DEFERRED_ENV = ("QWENSTACK_CONFIG", "QWENSTACK_ENGINE__URLS", "QWENSTACK_ENGINE__DISCOVERY_DNS")
DEFERRED_FLAGS = ("--config",)


def _flag(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def home_for(args: Sequence[str], environ: Mapping[str, str]) -> Path | None:
    """The home `qwenstack up ARGS` will use, or None when only the full settings can tell."""
    if any(environ.get(name) for name in DEFERRED_ENV) or any(
        _flag(args, flag) is not None or flag in args for flag in DEFERRED_FLAGS
    ):
        return None
    home = _flag(args, "--home") or environ.get("QWENSTACK_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "qwenstack"


def _engine_modules() -> types.ModuleType:
    # Run as a script, this folder comes first on the path, where venv.py would shadow the
    # standard library's venv module.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ENGINE]
    sys.path.insert(0, str(SRC))
    package = types.ModuleType("qwenstack.engine")
    package.__path__ = [str(ENGINE)]
    sys.modules["qwenstack.engine"] = package
    from qwenstack.engine import venv  # noqa: PLC0415 (needs the stand-in package above)

    return venv


def main(args: Sequence[str]) -> int:
    home = home_for(args, os.environ)
    if home is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="qwenstack: %(message)s")
    venv = _engine_modules()
    from qwenstack.engine import hardware  # noqa: PLC0415

    package = os.environ.get("QWENSTACK_ENGINE__PACKAGE") or venv.default_package(
        hardware.detect())
    os.umask(0o077)  # as qwenstack's own processes (database.make_private)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine_venv = venv.EngineVenv(home / "engine-venv", package, home / "logs" / "engine-venv.log")
    try:
        engine_venv.ensure()
    except venv.SetupError as exc:
        print(f"qwenstack: early engine install failed ({exc}); `up` tries again",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
