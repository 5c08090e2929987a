"""The measured implementation choices, kept across processes.

csrc/cpu/algo_choice.h times every candidate of a convolution pass (oneDNN, unetx's Winograd, its GEMMs) on the
first call for a key (shape, dtype, layout, thread count) and runs the winner from then on; the choices last for the
process, and measuring them is most of a first training step (BENCHMARKS.md, eleventh round). This module keeps them
in a file per machine and build, so that the next process on the same machine runs the winners from its first step:

    $UNETX_CACHE_DIR, else $XDG_CACHE_HOME/unetx, else ~/.cache/unetx: algo-choices-<machine>.json

<machine> hashes the CPU (model name and flags) and the compiled extension's path: one file per installation and CPU
kind (a home folder shared by several machines keeps one per kind). The file also records torch's version and the
extension's size and modification time: after a rebuild or another torch, its choices are stale, not loaded, and
the file is rewritten. `import unetx` loads the file (load()); a process that measured something new writes it at
exit (save(); `unetx train` also after its first step, so that a run killed later keeps them), merged with what the
file holds then, under a lock (torchrun's ranks exit together), through a temporary file renamed into place, so that
no reader sees half a file. A file that cannot be parsed is reported and removed; a folder that cannot be read or
written costs a one-line notice, never the run.
UNETX_ALGO_CACHE=0 turns the cache off (neither read nor written); deleting the folder forgets every choice.
UNETX_CONV_ALGO still forces a candidate over a loaded choice, as over a measured one.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from ._extension import _C

try:
    import fcntl
except ImportError:  # not POSIX: saves are not serialised across processes (the rename still keeps files whole)
    fcntl = None

_FORMAT = 1
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")
_HINT = "UNETX_CACHE_DIR=DIR puts the cache elsewhere, UNETX_ALGO_CACHE=0 turns it off"


def _notice(message: str) -> None:
    print(f"unetx: {message}", file=sys.stderr)


def enabled() -> bool:
    """UNETX_ALGO_CACHE: on unless 0 / off / false / no."""
    value = os.environ.get("UNETX_ALGO_CACHE", "1").strip().lower()
    if value not in _ON + _OFF:
        _warn_switch(value)
    return value not in _OFF


@functools.cache
def _warn_switch(value: str) -> None:
    _notice(
        f"UNETX_ALGO_CACHE={value!r} is neither on (1, on, true, yes) nor off (0, off, false, no); the measured-choice "
        "cache stays on"
    )


def cache_dir() -> Path | None:
    """The cache's folder; None where there is none to use (the cache is off, or there is no home folder)."""
    if not enabled():
        return None
    try:
        if os.environ.get("UNETX_CACHE_DIR"):
            return Path(os.environ["UNETX_CACHE_DIR"]).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # a relative one is ignored (XDG spec)
    except RuntimeError:  # no HOME and no passwd entry (some containers)
        return None
    return base / "unetx"


@functools.cache
def machine() -> dict:
    """What a choice depends on beyond its key: the CPU, torch and the extension's build. Taken once per process, so
    that a rebuild while it runs does not stamp its measurements with the new build."""
    cpu: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:  # the first processor's block: x86 (model name, flags), Arm (CPU implementer/part, Features)
            if not line.strip():
                break
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "CPU implementer", "CPU part", "Features"):
                cpu[key] = " ".join(sorted(value.split())) if key in ("flags", "Features") else value.strip()
    ext = Path(_C.__file__)
    st = ext.stat()
    return dict(
        cpu=cpu or {"machine": platform.machine(), "processor": platform.processor()},
        torch=torch.__version__,
        extension=str(ext),
        build=f"{st.st_size} {st.st_mtime_ns}",
    )


def cache_path() -> Path | None:
    """This machine and build's file (which may not exist yet); None where the cache is off or has no folder."""
    folder = cache_dir()
    if folder is None:
        return None
    m = machine()
    digest = hashlib.sha256(json.dumps([m["cpu"], m["extension"]], sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"algo-choices-{digest}.json"


class _Stale(Exception):
    """The file was written for another build of the extension or another torch."""


def _read(path: Path) -> list[dict]:
    """The file's decisions; raises _Stale, FileNotFoundError, another OSError, or ValueError (unparsable)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("machine"), dict):
        raise ValueError("not a unetx choice file of this format")
    if data["machine"] != machine():
        raise _Stale
    decisions = data.get("decisions")
    if not isinstance(decisions, list):
        raise ValueError("no list of decisions")
    for d in decisions:
        if not (
            isinstance(d, dict)
            and all(isinstance(d.get(k), str) for k in ("family", "key", "chosen"))
            and isinstance(d.get("seconds"), dict)
            and all(v is None or isinstance(v, (int, float)) for v in d["seconds"].values())
        ):
            raise ValueError(f"a malformed decision: {d!r:.200}")
    return decisions


def load() -> int:
    """Remember the choices this machine's earlier processes measured (for keys not decided yet); how many."""
    path = cache_path()
    if path is None:
        return 0
    try:
        decisions = _read(path)
    except (FileNotFoundError, NotADirectoryError, _Stale):
        return 0
    except ValueError as e:
        with contextlib.suppress(OSError):
            path.unlink()  # reported once, not at every import; the next save writes a good one
        _notice(f"removed the measured-choice cache {path}: it could not be parsed ({e}); this process measures")
        return 0
    except OSError as e:
        _notice(f"could not read the measured-choice cache {path} ({e}); this process measures ({_HINT})")
        return 0
    return _C.load_algo_choices(decisions)


@contextlib.contextmanager
def _locked(path: Path):
    """Holds <file>.lock while a process reads, merges and replaces the file (POSIX)."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save() -> Path | None:
    """Write this process's own measurements, merged with the file's current content; the file, or None where
    there was nothing of its own to write (or the cache is off, or the write failed: a notice says why)."""
    mine = [d for d in _C.algo_choices() if not d["loaded"]]
    path = cache_path() if mine else None
    if path is None:
        return None
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            merged = {}
            with contextlib.suppress(OSError, ValueError, _Stale):
                merged = {(d["family"], d["key"]): d for d in _read(path)}
            for d in mine:
                merged[d["family"], d["key"]] = {k: d[k] for k in ("family", "key", "chosen", "seconds")}
            decisions = sorted(merged.values(), key=lambda d: (d["family"], d["key"]))
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
                tmp = f.name
                json.dump(dict(format=_FORMAT, machine=machine(), decisions=decisions), f)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as any file the user creates (NamedTemporaryFile makes it 0600)
            os.replace(tmp, path)
    except OSError as e:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _notice(f"could not save the measured choices to {path} ({e}); the next process measures them again ({_HINT})")
        return None
    return path


def _save_at_exit() -> None:
    try:
        save()
    except Exception as e:  # an exit hook must not end a finished run with a traceback
        _notice(f"could not save the measured choices ({type(e).__name__}: {e}); the next process measures them again")


def install() -> None:
    """load() now and save() at exit (`import unetx` calls this once); a failure is a notice, never the import."""
    try:
        load()
    except Exception as e:  # a cache must not stop `import unetx`
        _notice(f"could not load the measured choices ({type(e).__name__}: {e}); this process measures ({_HINT})")
    atexit.register(_save_at_exit)
