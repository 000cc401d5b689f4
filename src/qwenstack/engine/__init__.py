"""Engines: vLLM OpenAI-server processes, started from their own venv and supervised."""

from __future__ import annotations

import logging

from qwenstack.engine import families, hardware, launch, models
from qwenstack.engine.launch import EngineLaunch
from qwenstack.engine.venv import EngineVenv, default_package
from qwenstack.settings import Settings

log = logging.getLogger(__name__)


def engine_venv(settings: Settings) -> EngineVenv:
    package = settings.engine.package or default_package(hardware.detect())
    return EngineVenv(settings.home / "engine-venv", package, settings.log_dir / "engine-venv.log")


def prepare_engines(settings: Settings) -> tuple[families.Parsers, list[EngineLaunch]]:
    """Install the engine if needed, pick the model, and check that its context fits. Returns
    the parsers the engines run with (what clients can use of the model) and the launches."""
    machine = hardware.detect()
    python = engine_venv(settings).ensure()
    model = models.resolve(settings, machine, python)
    launches = launch.build_launches(
        settings.engine, model, machine, python, settings.log_dir,
        settings.validation.allowed_media_domains,
    )
    parsers = families.choose(settings.engine, model.config, model.chat_template)
    log.info("%s: tool-call parser %s, reasoning parser %s", model.served_name,
             parsers.tool_call or "none", parsers.reasoning or "none")
    return parsers, launches
