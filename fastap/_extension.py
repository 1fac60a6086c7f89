"""Loads the compiled kernels and checks they were built for the torch that is imported."""

import importlib

import torch

_REBUILD = (
    "Rebuild fastap against the installed torch: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` in the fastap checkout."
)


def _load():
    try:
        build_info = importlib.import_module("fastap._build_info")
    except ImportError as err:
        raise ImportError(
            "fastap's compiled kernels are missing: this looks like the source tree rather than an "
            "installed fastap. Install it with `pip install --no-build-isolation .` (or `-e .`)."
        ) from err
    if build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fastap's kernels were compiled against torch {build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed. {_REBUILD}"
        )
    try:
        importlib.import_module("fastap._C")
    except ImportError as err:
        raise ImportError(f"fastap could not load its kernels ({err}). {_REBUILD}") from err
    return build_info


_build_info = _load()

#: True when the CUDA kernels were compiled into this installation.
WITH_CUDA: bool = _build_info.WITH_CUDA
