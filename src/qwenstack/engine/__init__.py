"""Engines: vLLM OpenAI-server processes, started from their own venv and supervised."""

from __future__ import annotations

import logging
from pathlib import Path

from qwenstack.engine import hardware, launch, models, roles
from qwenstack.engine.launch import EngineLaunch
from qwenstack.engine.venv import EngineVenv, default_package
from qwenstack.errors import SetupError
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
    described = [_described(entry, model) for entry, model in zip(served, resolved, strict=True)]
    for entry in described:
        log.info("%s (%s): tool-call parser %s, reasoning parser %s", entry.served_model_name,
                 entry.role, entry.tool_call_parser, entry.reasoning_parser)
    return described, launches


def chosen_parsers(settings: Settings) -> list[dict[str, str | None]]:
    """Each model's served name, role and the parsers its engines would run, as `up` chooses
    them, without installing or starting anything: a hub model's config and chat template are
    read from the hub (or its cache); the bundled model once `up` or `test-model --bundled`
    has prepared it. Engines started elsewhere (`engine.urls`, `discovery_dns`) run what their
    own command says; the settings describe them, and are printed as they are."""
    fields = {"served_model_name", "role", "tool_call_parser", "reasoning_parser"}
    if settings.engine.urls or settings.engine.discovery_dns:
        return [entry.model_dump(include=fields) if entry.role == roles.CHAT else
                {**entry.model_dump(include=fields), "tool_call_parser": "none",
                 "reasoning_parser": "none"}  # pooling engines run none (roles.py)
                for entry in settings.engine.served()]
    machine = hardware.detect()
    python = engine_venv(settings).python
    chosen = []
    for entry in settings.engine.served():
        if entry.model is None and not machine.has_gpu and not (
                Path(models.default_source(settings, machine)) / "config.json").is_file():
            raise SetupError("The bundled model is prepared by the first `qwenstack up` (or "
                             "`qwenstack test-model --bundled`): its parsers are read from it.")
        described = _described(entry, models.resolve(entry, settings, machine, python))
        chosen.append(described.model_dump(include=fields))
    return chosen


def _described(entry: ServedModelSettings, model: models.ResolvedModel) -> ServedModelSettings:
    """The entry as its engines serve it: its served name, and the parsers chosen for it
    ("none" for none: what clients can use of it)."""
    parsers = launch.parsers(entry, model)
    return entry.model_copy(update={
        "served_model_name": model.served_name,
        "tool_call_parser": parsers.tool_call or "none",
        "reasoning_parser": parsers.reasoning or "none",
    })
