"""Engines: vLLM OpenAI-server processes, started from their own venv and supervised."""

from __future__ import annotations

import logging

from qwenstack.engine import hardware, launch, models
from qwenstack.engine.launch import EngineLaunch
from qwenstack.engine.venv import EngineVenv, default_package
from qwenstack.settings import Settings
from qwenstack.settings.engine import ServedModelSettings

log = logging.getLogger(__name__)


def engine_venv(settings: Settings) -> EngineVenv:
    package = settings.engine.package or default_package(hardware.detect())
    return EngineVenv(settings.home / "engine-venv", package, settings.log_dir / "engine-venv.log")


def prepare_engines(settings: Settings) -> tuple[list[ServedModelSettings], list[EngineLaunch]]:
    """Install the engine if needed, pick the models, and check that they and their contexts
    fit. Returns the models served, each with its served name and the parsers its engines run
    with (what clients can use of it; "none" for none), and the launches."""
    machine = hardware.detect()
    python = engine_venv(settings).ensure()
    served = settings.engine.served()
    resolved = [models.resolve(entry, settings, machine, python) for entry in served]
    launches = launch.build_launches(
        settings.engine, resolved, machine, python, settings.log_dir,
        settings.validation.allowed_media_domains,
    )
    described = []
    for entry, model in zip(served, resolved, strict=True):
        parsers = launch.parsers(entry, model)
        log.info("%s (%s): tool-call parser %s, reasoning parser %s", model.served_name,
                 entry.role, parsers.tool_call or "none", parsers.reasoning or "none")
        described.append(entry.model_copy(update={
            "served_model_name": model.served_name,
            "tool_call_parser": parsers.tool_call or "none",
            "reasoning_parser": parsers.reasoning or "none",
        }))
    return described, launches
