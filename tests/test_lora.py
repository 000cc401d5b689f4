"""LoRA adapters as models: the shared stack's (conftest.py) bundled SmolLM2 serves one
(engine.lora, made as helpers.make_adapter makes them: random, so greedy text through it differs
from the base model's) and takes others at run time; this module's gateway, with keys, fronts it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import ADAPTER, SMOLLM2, Gateway, Stack, create_key, make_adapter, start_gateway
from test_responses import bearer

BASE, LOADED = SMOLLM2, "smollm2-adapter-2"


@pytest.fixture(scope="module")
def engine(stack: Stack) -> str:
    return stack.engine_of(BASE)


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory: pytest.TempPathFactory, bundled_smollm2: Path) -> Path:
    return make_adapter(bundled_smollm2, tmp_path_factory.mktemp("adapters") / "second", seed=2)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, engine: str) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("lora-gateway"), engine, auth=True,
                            env={"QWENSTACK_CACHE__ENABLED": "false"})
    yield gateway
    assert gateway.stop() == 0


def _greedy(url: str, model: str, key: str | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers=bearer(key) if key else {}, timeout=120,
                      json={"model": model, "prompt": "The capital of France is",
                            "max_tokens": 12, "temperature": 0})


# Tests that generate through an adapter have the engines to themselves: vLLM 0.32's CPU LoRA
# adds the adapter's delta to base-model requests batched with it (vllm-project/vllm#48421),
# and another test process's base-model answer (test_up_default_model.py's "Paris") came out
# as the random adapter's text.
@pytest.mark.engine_exclusive
def test_an_adapter_is_a_model_of_its_own(gateway: Gateway, engine: str) -> None:
    key = create_key(gateway.home, "--name", "lora-user")
    listed = httpx.get(f"{gateway.url}/v1/models", headers=bearer(key), timeout=30).json()
    cards = {card["id"]: card for card in listed["data"]}
    assert set(cards) == {BASE, ADAPTER} and cards[ADAPTER]["parent"] == BASE
    base = _greedy(gateway.url, BASE, key)
    adapted = _greedy(gateway.url, ADAPTER, key)
    assert base.status_code == 200 and adapted.status_code == 200, adapted.text
    base_text, adapted_text = (r.json()["choices"][0]["text"] for r in (base, adapted))
    assert adapted_text != base_text
    assert adapted_text == _greedy(engine, ADAPTER).json()["choices"][0]["text"]
    assert adapted.json()["model"] == ADAPTER


@pytest.mark.engine_exclusive  # it generates through the adapter (above)
def test_keys_are_scoped_to_adapters_by_name(gateway: Gateway) -> None:
    base_only = create_key(gateway.home, "--name", "base-only", "--models", BASE)
    adapter_only = create_key(gateway.home, "--name", "adapter-only", "--models", ADAPTER)
    denied = _greedy(gateway.url, ADAPTER, base_only)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    assert _greedy(gateway.url, ADAPTER, adapter_only).status_code == 200
    assert _greedy(gateway.url, BASE, adapter_only).status_code == 403
    listed = httpx.get(f"{gateway.url}/v1/models", headers=bearer(adapter_only), timeout=30)
    assert [card["id"] for card in listed.json()["data"]] == [ADAPTER]


@pytest.mark.engine_exclusive  # the adapter it loads would show in the others' model lists
def test_only_admins_load_adapters_and_only_through_the_gateway(
    gateway: Gateway, second_adapter: Path
) -> None:
    tenant = create_key(gateway.home, "--name", "lora-tenant")
    admin = create_key(gateway.home, "--name", "lora-admin", "--admin")
    load = {"name": LOADED, "path": str(second_adapter), "model": BASE}
    # vLLM's own routes are not forwarded, to anyone.
    for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        for key in (tenant, admin):
            engine_route = httpx.post(f"{gateway.url}{route}", headers=bearer(key), timeout=30,
                                      json={"lora_name": LOADED, "lora_path": str(second_adapter)})
            assert engine_route.status_code == 404, engine_route.text
    refused = httpx.post(f"{gateway.url}/admin/lora_adapters", headers=bearer(tenant),
                         json=load, timeout=30)
    assert refused.status_code == 403, refused.text
    assert LOADED not in _models(gateway, admin)

    loaded = httpx.post(f"{gateway.url}/admin/lora_adapters", headers=bearer(admin), json=load,
                        timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert LOADED in _models(gateway, admin)
    answer = _greedy(gateway.url, LOADED, admin)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] != _greedy(gateway.url, BASE, admin).json()[
        "choices"][0]["text"]
    again = httpx.post(f"{gateway.url}/admin/lora_adapters", headers=bearer(admin), json=load,
                       timeout=30)
    assert again.status_code == 409, again.text
    bad = httpx.post(f"{gateway.url}/admin/lora_adapters", headers=bearer(admin), timeout=60,
                     json={**load, "name": "no-such-folder", "path": "/nonexistent/adapter"})
    assert bad.status_code == 502 and bad.json()["error"]["code"] == "lora_adapter_failed"
    assert "no-such-folder" not in _models(gateway, admin)

    unloaded = httpx.delete(f"{gateway.url}/admin/lora_adapters/{LOADED}",
                            headers=bearer(admin), timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    assert LOADED not in _models(gateway, admin)
    assert _greedy(gateway.url, LOADED, admin).status_code == 404
    # A base model is no adapter to unload; an adapter's name may hold `/`, and unloads.
    base = httpx.delete(f"{gateway.url}/admin/lora_adapters/{BASE}", headers=bearer(admin),
                        timeout=60)
    assert base.status_code == 404 and BASE in _models(gateway, admin), base.text
    slashed = {**load, "name": "team/adapter"}
    assert httpx.post(f"{gateway.url}/admin/lora_adapters", headers=bearer(admin), json=slashed,
                      timeout=120).status_code == 200
    unloaded = httpx.delete(f"{gateway.url}/admin/lora_adapters/team/adapter",
                            headers=bearer(admin), timeout=60)
    assert unloaded.status_code == 200 and "team/adapter" not in _models(gateway, admin)


def test_adapter_settings_become_vllm_flags(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No engine: the launch `up` and `engine` would run."""
    from test_engine_launch import GPU, _plan

    from qwenstack.engine.lora import RUNTIME_UPDATES
    from qwenstack.errors import SetupError
    from qwenstack.settings import load_settings

    [plain] = _plan(tmp_path)
    assert "--enable-lora" not in plain.argv and RUNTIME_UPDATES not in plain.env
    adapters = {"team-a": "/adapters/a=1", "team-b": "org/adapter"}
    with caplog.at_level(logging.WARNING, logger="qwenstack.engine.launch"):
        [served] = _plan(tmp_path, lora={"adapters": adapters, "max_lora_rank": 32})
    # On a CPU, vLLM mixes an adapter's delta into base-model requests batched with it.
    assert "vllm-project/vllm#48421" in caplog.text
    caplog.clear()
    _plan(tmp_path, hardware=GPU, lora={"adapters": adapters})
    assert "48421" not in caplog.text
    argv = served.argv
    assert argv[argv.index("--max-lora-rank") + 1] == "32" and "--enable-lora" in argv
    modules = argv[argv.index("--lora-modules") + 1:argv.index("--lora-modules") + 3]
    assert [json.loads(module) for module in modules] == [  # JSON: a folder may hold `=`
        {"name": name, "path": path} for name, path in adapters.items()]
    assert RUNTIME_UPDATES not in served.env
    [runtime] = _plan(tmp_path, lora={"runtime_loading": True})
    assert "--enable-lora" in runtime.argv and runtime.env[RUNTIME_UPDATES] == "True"
    assert "--lora-modules" not in runtime.argv
    with pytest.raises(SetupError, match="engine.lora"):
        _plan(tmp_path, extra_args=["--enable-lora"])
    with pytest.raises(ValueError, match="LoRA adapter"):
        load_settings(**{"engine.lora": {"adapters": {"bad name": "/x"}}})


def _models(gateway: Gateway, key: str) -> set[str]:
    listed = httpx.get(f"{gateway.url}/v1/models", headers=bearer(key), timeout=30)
    return {card["id"] for card in listed.json()["data"]}
