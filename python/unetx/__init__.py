"""unetx: a U-Net for image segmentation whose conv-BN-ReLU, pooling and skip concatenation run on fused kernels.

    import unetx
    model = unetx.UNet(in_channels=1, out_channels=2)      # drop-in nn.Module, state_dict-compatible with
    ref = unetx.reference.UNet(in_channels=1, out_channels=2)   # ... this plain-PyTorch twin

Three layers, each importing only the ones above it in this list:
    unetx.ops   the op library: the compiled kernels' wrappers, fake impls, autograd, fallbacks, references
    unetx.nn    the neural-network modules: fused layers, UNet, its plain-PyTorch twin, convert()
    unetx.app   the segmentation application: data, losses, metrics, training, evaluation, prediction, CLI
`import unetx` loads the first two (torch and numpy only); the application and its dependencies (Pillow, scipy,
matplotlib, tifffile, tqdm) load on first use of one of its names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

import torch  # noqa: F401  (load libtorch before the extension)

from . import nn, ops, reference
from .nn import ConvBNReLU, DoubleConv, UNet, convert
from .ops import build_info

__version__ = "0.1.0"

# name -> (the application module that holds it, the attribute; None: the module itself), imported on first access
_LAZY = {
    "app": ("unetx.app", None),
    "checkpoint": ("unetx.app.checkpoint", None),
    "data": ("unetx.app.data", None),
    "losses": ("unetx.app.losses", None),
    "metrics": ("unetx.app.metrics", None),
    "predict": ("unetx.app.predict", None),
    "synthetic": ("unetx.app.synthetic", None),
    "ClassTable": ("unetx.app.data", "ClassTable"),
    "InputError": ("unetx.app.errors", "InputError"),
    "TrainConfig": ("unetx.app.training", "TrainConfig"),
    "evaluate": ("unetx.app.evaluate", "evaluate"),
    "predict_tiled": ("unetx.app.predict", "predict_tiled"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'unetx' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


class _AppModuleAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import unetx.checkpoint` / `from unetx.data import ...` keep working (the application modules lived at the
    top level before the layers were packages): the alias resolves, on import, to the application module itself."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        entry = _LAZY.get(name) if prefix == __name__ and "." not in name else None
        if entry is None or entry[1] is not None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(_LAZY[spec.name.partition(".")[2]][0])

    def exec_module(self, module):
        pass


if not any(isinstance(f, _AppModuleAlias) for f in sys.meta_path):
    sys.meta_path.append(_AppModuleAlias())


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ClassTable",
    "ConvBNReLU",
    "DoubleConv",
    "InputError",
    "TrainConfig",
    "UNet",
    "__version__",
    "app",
    "build_info",
    "checkpoint",
    "convert",
    "data",
    "evaluate",
    "losses",
    "metrics",
    "nn",
    "ops",
    "predict",
    "predict_tiled",
    "reference",
    "synthetic",
]
