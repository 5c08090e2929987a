"""Checkpoints: everything needed to rebuild, use and resume a trained UNet, in a file `torch.load(weights_only=True)`
can read (tensors and plain containers only), written atomically.

    unetx.checkpoint.save("run/best.pt", model, classes=table, normalize="dtype", loss="ce+dice", epoch=3)
    model, ckpt = unetx.checkpoint.load_model("run/best.pt")      # a UNet in eval mode, and the checkpoint dict

Keys: format, unetx_version, model ("unetx.UNet"), config (UNet constructor arguments), state_dict, classes
(ClassTable.to_dict()), normalize, loss, epoch (completed epochs), and for resuming: optimizer, scheduler, scaler,
history (per-epoch lists), best ({"epoch", "score"}), train_args (the training options), world_size.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .data import ClassTable
from .errors import InputError

FORMAT = "unetx-checkpoint-v1"
MODEL = "unetx.UNet"


def unwrap(model: nn.Module) -> nn.Module:
    """The UNet inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _read_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only read by setting, which
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import (single-threaded then)


def _unnamed_file(folder: Path) -> int | None:
    """An O_TMPFILE file in folder: it has no name until linked, so a process killed while writing it (even by
    SIGKILL) leaves nothing behind. None where the system or file system has no O_TMPFILE."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o666)  # the kernel applies the umask to 0o666
    except OSError:
        return None


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) on a temporary file in path's folder, then rename it over path (atomic on POSIX):
    a reader sees the old file or the new one, never half of one, and a crash leaves the old file intact.

    The file gets the permissions a plain open() would (0o666 less the umask), not a private temporary file's
    0o600. On Linux the data is written to an unnamed file that gets a (hidden) name only for the final rename, so
    a killed process leaves no temporary file; elsewhere a killed process can leave a hidden .NAME.*.tmp file."""
    path = Path(path)
    fd = _unnamed_file(path.parent)
    if fd is not None:
        try:
            write(f"/proc/self/fd/{fd}")
            os.fsync(fd)
            tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
            try:  # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: gives the unnamed file a name
                os.link(str(fd), tmp, src_dir_fd=fds, follow_symlinks=True)
                named = True
            except OSError:  # a system that refuses it: write again through a named temporary file below
                named = False
            finally:
                os.close(fds)
            if named:
                try:
                    os.replace(tmp, path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                return
        finally:
            os.close(fd)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_dict(
    model: nn.Module, *, classes: ClassTable, normalize: str = "dtype", loss: str = "ce+dice", epoch: int = 0, **extra
) -> dict:
    """The checkpoint dict of a model (weights copied to the CPU) and its metadata."""
    m = unwrap(model)
    config = getattr(m, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"checkpoint: expected a unetx.UNet (with .config), got {type(m).__name__}")
    from .. import __version__

    state = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
    ckpt = {
        "format": FORMAT,
        "unetx_version": __version__,
        "model": MODEL,
        "config": dict(config),
        "state_dict": state,
        "classes": classes.to_dict(),
        "normalize": normalize,
        "loss": loss,
        "epoch": int(epoch),
    }
    ckpt.update(extra)
    return ckpt


def write(path: str | Path, ckpt: dict) -> None:
    """Save a checkpoint dict atomically; weights that are not finite are refused, so a diverged run can never
    replace a good checkpoint."""
    for k, v in ckpt["state_dict"].items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"refusing to write {path}: weight {k!r} is not finite (training diverged)")
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def save(path: str | Path, model: nn.Module, **kw) -> None:
    """Write a checkpoint of `model` atomically (keyword arguments: see `to_dict` and the module docstring)."""
    write(path, to_dict(model, **kw))


def load(path: str | Path, map_location="cpu") -> dict:
    """Read and validate a unetx checkpoint (a run folder means its best.pt); anything else raises one InputError
    saying what the file is."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise InputError(f"checkpoint {path} is a folder without best.pt or last.pt")
    if not path.exists():
        raise InputError(
            f"checkpoint {path} does not exist; give the best.pt or last.pt of a `unetx train` run "
            "(or the run's folder)"
        )
    if not path.is_file():
        raise InputError(f"checkpoint {path} is not a regular file; give a best.pt or last.pt written by `unetx train`")
    try:
        # a damaged file can make torch warn before it fails (junk starting with pickle's PROTO byte: "pickle
        # protocol 155"); those warnings say nothing the error below does not, so they are shown only on success
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except pickle.UnpicklingError as e:
        # torch's message is mostly advice on weights_only=False, which unetx never uses; keep the global it names
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise InputError(
                f"{path} is not a unetx checkpoint: it is not a PyTorch file, or it is truncated or "
                "damaged; give a best.pt or last.pt written by `unetx train`"
            ) from None
        raise InputError(
            f"{path} is not a unetx checkpoint: it holds Python objects ({found.group(1)}) that are "
            "not loaded, for safety; give a best.pt or last.pt written by `unetx train`"
        ) from None
    except MemoryError:
        raise InputError(f"{path} is not a unetx checkpoint: reading it needs more memory than there is") from None
    except Exception as e:
        # IndexError, EOFError, RuntimeError, zipfile errors, ...): one message naming the file
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise InputError(
            f"{path} is not a unetx checkpoint: it is not a PyTorch file, or it is truncated or damaged "
            f"({type(e).__name__}{': ' + first if first else ''}); give a best.pt or last.pt written by "
            "`unetx train`"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = type(ckpt).__name__
        if isinstance(ckpt, dict):
            if ckpt.get("format") is not None:
                what = f"a file of format {ckpt['format']!r}"
            elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
                what = "a bare state_dict without the model's configuration"
            else:
                what = f"a dict with keys {sorted(map(str, ckpt))[:6]}"
        raise InputError(
            f"{path} is not a unetx checkpoint (format {FORMAT}): it holds {what}; give a best.pt or "
            "last.pt written by `unetx train` (a bare state_dict loads with unetx.UNet(...).load_state_dict)"
        )
    missing = [k for k in ("config", "state_dict", "classes", "model", "normalize") if k not in ckpt]
    if missing or ckpt["model"] != MODEL:
        raise InputError(f"{path} is a damaged unetx checkpoint (missing {missing}, model {ckpt.get('model')!r})")
    from .data import NORMALIZATIONS

    problems = []
    if not isinstance(ckpt["config"], dict):
        problems.append(f"config is a {type(ckpt['config']).__name__}, not a dict")
    if not isinstance(ckpt["state_dict"], dict):
        problems.append(f"state_dict is a {type(ckpt['state_dict']).__name__}, not a dict")
    if ckpt["normalize"] not in NORMALIZATIONS:
        problems.append(f"normalize {ckpt['normalize']!r} is not one of {NORMALIZATIONS}")
    try:
        ClassTable.from_dict(ckpt["classes"])
    except Exception as e:
        problems.append(f"its class table is damaged ({type(e).__name__}: {str(e)[:120]})")
    if problems:
        raise InputError(
            f"{path} is a damaged unetx checkpoint: {'; '.join(problems)}; give a best.pt or last.pt "
            "written by `unetx train`"
        )
    return ckpt


def build_model(ckpt: dict, path: str | Path = "checkpoint", sync_bn: bool = False) -> nn.Module:
    """The UNet the checkpoint describes, with its weights (train mode, on the CPU)."""
    from ..nn import UNet

    try:
        model = UNet(**ckpt["config"], sync_bn=sync_bn)
    except Exception as e:
        raise InputError(f"{path}: cannot build the model from its config {ckpt['config']}: {e}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise InputError(
            f"{path}: the weights do not fit the model it describes ({str(e).splitlines()[0][:300]}); "
            "the checkpoint is damaged or was edited"
        ) from None
    return model


def load_model(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """(UNet in eval mode on `device`, checkpoint dict) from a checkpoint file or run folder."""
    ckpt = load(path)
    model = build_model(ckpt, path)
    if device is not None:
        model = model.to(device)
    return model.eval(), ckpt


def class_table(ckpt: dict) -> ClassTable:
    return ClassTable.from_dict(ckpt["classes"])
