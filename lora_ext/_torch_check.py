"""Refuse, at import, a torch other than the one lora_ext._C was built against.

``_C`` uses torch's C++ API, whose ABI changes between releases: loaded into another
torch it may fail to load, or load and misbehave later. So ``import lora_ext`` compares
the torch release (and CUDA-ness) recorded at build time in ``_build_info.py`` with the
running one, before ``_C`` is loaded, and says what to rebuild.
"""

from __future__ import annotations

from typing import Optional

REBUILD_HINT = (
    "Rebuild lora_ext against the installed torch: from a source checkout, "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` "
    "(or `bash scripts/setup.sh`); or install the lora_ext wheel built for torch {running}"
)


def _release(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: the local tag names the build flavour, not the ABI."""
    return version.split("+", 1)[0]


def check_torch_compatible(
    built_torch: str, built_cuda: Optional[str], running_torch: str, running_cuda: Optional[str]
) -> None:
    """Raise ImportError when a _C built for ``built_torch`` cannot run under ``running_torch``."""
    if _release(built_torch) != _release(running_torch):
        raise ImportError(
            f"lora_ext was built against torch {built_torch} but torch {running_torch} is "
            f"installed; its C++ kernels only work with the torch release they were built "
            f"for. " + REBUILD_HINT.format(running=_release(running_torch))
        )
    if built_cuda is not None and running_cuda is None:
        raise ImportError(
            f"lora_ext was built with CUDA {built_cuda} kernels against a CUDA build of torch "
            f"{built_torch}, but the installed torch {running_torch} is a CPU-only build. "
            + REBUILD_HINT.format(running=_release(running_torch))
        )
    if built_cuda is not None and built_cuda.split(".")[0] != running_cuda.split(".")[0]:
        raise ImportError(
            f"lora_ext's CUDA kernels were built for CUDA {built_cuda} but torch "
            f"{running_torch} uses CUDA {running_cuda}. "
            + REBUILD_HINT.format(running=_release(running_torch))
        )


def check_installed_torch() -> None:
    """Check the running torch against ``_build_info``; raise ImportError if unusable."""
    import torch

    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            "lora_ext's compiled part is missing (no lora_ext/_build_info.py next to _C): "
            "it is not built. Build it with `pip install --no-build-isolation .` from the "
            "source checkout (or `bash scripts/setup.sh`)."
        ) from None
    check_torch_compatible(
        _build_info.TORCH_VERSION, _build_info.CUDA_VERSION, torch.__version__, torch.version.cuda
    )
