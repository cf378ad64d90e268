"""Installation: the environment the scripts pick, and the torch-release check at import.

The wheel itself is checked by scripts/wheel_check.sh (run by CI): it installs the wheel
into fresh virtual environments, runs the op tests against it under the torch it was
built for, and checks that another torch release is refused at import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_ext
from lora_ext import _build_info
from lora_ext._torch_check import check_installed_torch, check_torch_compatible

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------ torch release check


def test_the_build_matches_the_running_torch():
    assert _build_info.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]
    check_installed_torch()
    assert torch.ops.lora_ext.multi_lora.default is not None


@pytest.mark.parametrize(
    "built, built_cuda, running, running_cuda",
    [
        ("2.13.0+cpu", None, "2.13.0+cpu", None),
        ("2.13.0+cpu", None, "2.13.0", "13.0"),  # CPU kernels run under a CUDA build
        ("2.14.1+cu130", "13.0", "2.14.1+cu130", "13.0"),
        ("2.14.1+cu130", "13.0", "2.14.1", "13.2"),  # same CUDA major
    ],
)
def test_compatible_builds_pass(built, built_cuda, running, running_cuda):
    check_torch_compatible(built, built_cuda, running, running_cuda)


@pytest.mark.parametrize(
    "built, built_cuda, running, running_cuda, expected",
    [
        ("2.13.0+cpu", None, "2.14.1+cu130", "13.0", "built against torch 2.13.0+cpu but torch 2.14.1+cu130"),
        ("2.13.0", None, "2.13.1", None, "built against torch 2.13.0 but torch 2.13.1"),
        ("2.14.1+cu130", "13.0", "2.14.1+cpu", None, "CPU-only build"),
        ("2.14.1+cu126", "12.6", "2.14.1+cu130", "13.0", "built for CUDA 12.6 but torch 2.14.1+cu130 uses CUDA 13.0"),
    ],
    ids=["other-release", "other-patch", "cuda-kernels-cpu-torch", "other-cuda-major"],
)
def test_incompatible_builds_are_refused_with_what_to_rebuild(built, built_cuda, running, running_cuda, expected):
    with pytest.raises(ImportError) as e:
        check_torch_compatible(built, built_cuda, running, running_cuda)
    assert expected in str(e.value)
    assert "Rebuild lora_ext against the installed torch" in str(e.value)
    assert "--no-build-isolation" in str(e.value)


def test_import_checks_before_loading_the_kernels(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 but torch "):
        check_installed_torch()
    init = Path(lora_ext.__file__).read_text()
    assert init.index("_check_installed_torch()") < init.index("from . import _C")


# ------------------------------------------------------------ scripts/env.sh


def _env_sh(checkout: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", 'source scripts/env.sh && echo "PY=$PY"'],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture
def checkout(tmp_path):
    """A folder laid out like the checkout, holding only scripts/env.sh."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "env.sh", tmp_path / "scripts" / "env.sh")
    return tmp_path


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON")}
    env.update(extra)
    return env


def test_env_sh_creates_a_venv_in_the_checkout_once_and_reuses_it(checkout):
    base = getattr(sys, "_base_executable", sys.executable)
    first = _env_sh(checkout, _clean_env(PYTHON=base))
    assert first.returncode == 0, first.stderr
    venv_python = checkout / ".venv" / "bin" / "python"
    assert f"PY={venv_python}" in first.stdout
    assert "creating the virtual environment" in first.stdout
    again = _env_sh(checkout, _clean_env(PYTHON=base))
    assert again.returncode == 0 and f"PY={venv_python}" in again.stdout
    assert "creating" not in again.stdout


def test_env_sh_uses_the_active_venv(checkout, tmp_path_factory):
    active = tmp_path_factory.mktemp("active")
    (active / "bin").mkdir()
    (active / "bin" / "python").symlink_to(sys.executable)
    result = _env_sh(checkout, _clean_env(VIRTUAL_ENV=str(active)))
    assert result.returncode == 0, result.stderr
    assert f"PY={active / 'bin' / 'python'}" in result.stdout
    assert not (checkout / ".venv").exists()


def test_env_sh_refuses_an_old_python(checkout, tmp_path_factory):
    fake = tmp_path_factory.mktemp("py") / "python3.9"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.9.18' && exit 0\nexit 1\n")
    fake.chmod(0o755)
    result = _env_sh(checkout, _clean_env(PYTHON=str(fake)))
    assert result.returncode != 0
    assert "needs Python 3.10 or newer" in result.stderr and "3.9.18" in result.stderr
    assert not (checkout / ".venv").exists()
