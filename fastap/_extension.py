"""Loads the compiled kernels and checks they were built for the torch that is imported."""

from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_REBUILD = (
    "Rebuild fastap against the installed torch: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` in the fastap checkout."
)


def _load() -> None:
    try:
        from . import _build_info
    except ImportError as err:
        raise ImportError(
            "fastap's compiled kernels are missing (fastap/_C.so was not built). "
            "Install fastap with `pip install --no-build-isolation .` rather than importing it "
            "from the source tree."
        ) from err
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fastap's kernels were compiled against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed. {_REBUILD}"
        )
    library = _HERE / "_C.so"
    try:
        torch.ops.load_library(str(library))
    except OSError as err:
        raise ImportError(f"fastap could not load {library}: {err}. {_REBUILD}") from err


_load()

from . import _build_info  # noqa: E402

#: True when the CUDA kernels were compiled into this installation.
WITH_CUDA: bool = _build_info.WITH_CUDA
