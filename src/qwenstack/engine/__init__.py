"""Engines: vLLM OpenAI-server processes, started from their own venv and supervised."""

from __future__ import annotations

from qwenstack.engine import hardware, launch, models
from qwenstack.engine.launch import EngineLaunch
from qwenstack.engine.models import ResolvedModel
from qwenstack.engine.venv import EngineVenv, default_package
from qwenstack.settings import Settings


def engine_venv(settings: Settings) -> EngineVenv:
    package = settings.engine.package or default_package(hardware.detect())
    return EngineVenv(settings.home / "engine-venv", package, settings.log_dir / "engine-venv.log")


def prepare_engines(settings: Settings) -> tuple[ResolvedModel, list[EngineLaunch]]:
    """Install the engine if needed, pick the model, and check that its context fits."""
    machine = hardware.detect()
    python = engine_venv(settings).ensure()
    model = models.resolve(settings, machine, python)
    return model, launch.build_launches(
        settings.engine, model, machine, python, settings.log_dir,
        settings.validation.allowed_media_domains,
    )
