"""The extension loader: load the compiled extension (unetx._C, which registers torch.ops.unetx.*), refusing clearly
when it was built for another torch. Imports nothing of unetx's own: the op modules import it, never the reverse
(build_info() lives in ops/_dispatch.py, beside the CUDA opt-in it reports)."""

from __future__ import annotations

import torch

_REBUILD = (
    "Rebuild unetx against the torch you have: `pip install --force-reinstall --no-deps .` in the unetx source "
    "folder (add --no-build-isolation for the fast developer build)."
)

try:
    from unetx import _C  # type: ignore[attr-defined]
except ImportError as e:  # an undefined symbol is what an ABI mismatch looks like
    raise ImportError(
        f"unetx: could not load its compiled extension ({e}). torch is {torch.__version__}. {_REBUILD}"
    ) from e

BUILD_INFO: dict = dict(_C.build_info())

if BUILD_INFO["torch_version"] != torch.__version__:
    raise ImportError(
        f"unetx: the extension was built against torch {BUILD_INFO['torch_version']}, but torch {torch.__version__} "
        f"is imported; a C++ extension only works with the torch it was compiled for. {_REBUILD}"
    )
