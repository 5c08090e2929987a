"""The measured implementation choices, kept across processes.

csrc/cpu/algo_choice.h times every candidate of a convolution pass (oneDNN, unetx's Winograd, its GEMMs) on the
first call for a key (shapes, dtype, options, thread count) and runs the winner from then on; the choices last for the
process, and measuring them is most of a first training step (BENCHMARKS.md, eleventh round). This module keeps them
in a file per machine and build, so that the next process on the same machine runs the winners from its first step:

    $UNETX_CACHE_DIR, else $XDG_CACHE_HOME/unetx, else ~/.cache/unetx: algo-choices-<machine>.json

<machine> hashes the CPU (model name and flags) and the compiled extension's path: one file per installation and CPU
kind (a home folder shared by several machines keeps one per kind). The file also records torch's version and the
extension's size and modification time: after a rebuild or another torch, its choices are stale, not loaded, and
the file is rewritten (by a process of the installed build: one that started before the rebuild leaves it alone).
`import unetx` loads the file (load()); a process that measured something new writes it at exit (save(); `unetx
train` also after its first step, so that a run killed later keeps them), merged with what the file holds then,
under a lock (<file>.lock; torchrun's ranks exit together), through a temporary file renamed into place, so that no
reader sees half a file. A file that cannot be parsed is reported and removed; a folder that cannot be read or
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
import secrets
import sys
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
    value = os.environ.get("UNETX_ALGO_CACHE", "").strip().lower() or "1"
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
    return dict(
        cpu=cpu or {"machine": platform.machine()}, torch=torch.__version__, extension=str(ext), build=_build_of(ext)
    )


def _build_of(extension: Path) -> str:
    """Which build of the extension file this is: its size and modification time (a rebuild changes them)."""
    st = extension.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


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
    """The file's decisions; raises _Stale (another format, build or torch), FileNotFoundError, another OSError, or
    ValueError (unparsable)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("machine"), dict):
        raise ValueError("not a unetx choice file")
    if data.get("format") != _FORMAT or data["machine"] != machine():
        raise _Stale
    decisions = data.get("decisions")
    if not isinstance(decisions, list):
        raise ValueError("no list of decisions")
    for d in decisions:
        if not (
            isinstance(d, dict)
            and all(isinstance(d.get(k), str) and d[k].isprintable() for k in ("family", "key", "chosen"))
            and isinstance(d.get("seconds"), dict)
            and all(n.isprintable() for n in d["seconds"])
            and all(v is None or (type(v) in (int, float) and abs(v) < 1e300) for v in d["seconds"].values())
        ):
            raise ValueError(f"a malformed decision: {d!r:.200}")
    return decisions


def load() -> int:
    """Remember the choices this machine's earlier processes measured (for keys not decided yet); how many."""
    path = cache_path()
    if path is None:
        return 0
    try:
        return _C.load_algo_choices(_read(path))
    except (FileNotFoundError, NotADirectoryError, _Stale):
        return 0
    except ValueError as e:
        _remove_unparsable(path, e)
        return 0
    except OSError as e:
        _notice(f"could not read the measured-choice cache {path} ({e}); this process measures ({_HINT})")
        return 0


def _remove_unparsable(path: Path, error: Exception) -> None:
    """Removes a file that cannot be parsed (once reported, not at every import), unless another process has
    replaced it with a good one meanwhile."""
    removed = False
    with contextlib.suppress(OSError), _locked(path):
        try:
            _read(path)
        except ValueError:
            path.unlink()
            removed = True
        except (OSError, _Stale):
            pass
    what = "removed" if removed else "ignored"
    _notice(f"{what} the measured-choice cache {path}: it could not be parsed ({error}); this process measures")


@contextlib.contextmanager
def _locked(path: Path):
    """Holds <file>.lock (left in the folder, empty) while a process reads, merges and replaces the file (POSIX):
    torchrun's ranks save at the same moment."""
    if fcntl is None:
        yield
        return
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def save() -> Path | None:
    """Write this process's own measurements, merged with the file's current content; the file, or None where
    there was nothing of its own to write (or the cache is off, or the write failed: a notice says why)."""
    mine = [d for d in _C.algo_choices() if not d["loaded"]]
    if not mine:
        return None
    path, tmp = None, None
    try:
        path = cache_path()
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            merged = {}
            try:
                merged = {(d["family"], d["key"]): d for d in _read(path)}
            except _Stale:
                if not _our_build_installed():
                    return None  # the extension was rebuilt while this process ran: its file is the new build's
            except (OSError, ValueError):
                pass
            for d in mine:
                merged[d["family"], d["key"]] = {k: d[k] for k in ("family", "key", "chosen", "seconds")}
            decisions = sorted(merged.values(), key=lambda d: (d["family"], d["key"]))
            # created 0666 less the umask (and any default ACL), as the user's other files: a shared cache folder
            # stays usable by the others; O_EXCL: a name no other process is writing
            tmp = str(path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
                json.dump(dict(format=_FORMAT, machine=machine(), decisions=decisions), f)
            os.replace(tmp, path)
            tmp = None
    except OSError as e:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _notice(f"could not save the measured choices to {path} ({e}); the next process measures them again ({_HINT})")
        return None
    return path


def _our_build_installed() -> bool:
    m = machine()
    try:
        return _build_of(Path(m["extension"])) == m["build"]
    except OSError:
        return False


def save_quietly() -> None:
    """save(), any failure a notice: for exit hooks and the middle of a training run."""
    try:
        save()
    except Exception as e:  # a cache must not end a run (or a finished run's exit) with a traceback
        _notice(f"could not save the measured choices ({type(e).__name__}: {e}); the next process measures them again")


def measure_afresh() -> None:
    """Forget every choice, loaded ones included, so that this process measures its own (benchmarks: repeated runs
    stay independent samples and a noisy choice is not carried from one to the next). What it measures is saved for
    later processes as usual."""
    _C.clear_algo_choices()


def install() -> None:
    """load() now and save() at exit (`import unetx` calls this once); a failure is a notice, never the import."""
    try:
        load()
    except Exception as e:  # a cache must not stop `import unetx`
        _notice(f"could not load the measured choices ({type(e).__name__}: {e}); this process measures ({_HINT})")
    atexit.register(save_quietly)
