"""What `qwenstack` shows of secrets: `qwenstack config` masks the user-info of every URL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import forkhost


def test_config_masks_url_passwords(tmp_path: Path) -> None:
    env = {
        **os.environ, "QWENSTACK_HOME": str(tmp_path / "home"),
        "QWENSTACK_DATABASE_URL": "postgresql+psycopg://keys:db-password@db/qwenstack",
        "QWENSTACK_UI__DATABASE_URL": "postgresql+psycopg://ui:ui-password@db/ui",
        "QWENSTACK_CACHE__BACKEND": "redis",
        "QWENSTACK_CACHE__REDIS_URL": "redis://:cache-password@redis:6379/0",
        "QWENSTACK_LIMITS__REDIS_URL": "redis://default:limits-password@redis:6379/1",
        "QWENSTACK_RAG__MILVUS_URI": "http://root:milvus-password@milvus:19530",
    }
    shown = forkhost.run(["config"], env=env, check=True, timeout=120).stdout
    assert "-password" not in shown
    settings = json.loads(shown)
    assert settings["database_url"] == "postgresql+psycopg://keys:***@db/qwenstack"
    assert settings["ui"]["database_url"] == "postgresql+psycopg://ui:***@db/ui"
    assert settings["cache"]["redis_url"] == "redis://:***@redis:6379/0"
    assert settings["limits"]["redis_url"] == "redis://default:***@redis:6379/1"
    assert settings["rag"]["milvus_uri"] == "http://root:***@milvus:19530"
    # The home it made is its user's alone.
    assert (tmp_path / "home").stat().st_mode & 0o777 == 0o700
