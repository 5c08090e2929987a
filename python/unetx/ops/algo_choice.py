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
exit (save()), merged with what other processes wrote meanwhile (torchrun's ranks), through a temporary file renamed
into place, so that no reader sees half a file. A file that cannot be read is ignored with a warning and rewritten.
UNETX_ALGO_CACHE=0 turns the cache off (neither read nor written); deleting the folder forgets every choice.
UNETX_CONV_ALGO still forces a candidate over a loaded choice, as over a measured one.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ._extension import _C

_FORMAT = 1
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def enabled() -> bool:
    """UNETX_ALGO_CACHE: on unless 0 / off / false / no."""
    value = os.environ.get("UNETX_ALGO_CACHE", "1").strip().lower()
    if value not in _ON + _OFF:
        warnings.warn(
            f"unetx: UNETX_ALGO_CACHE={value!r} is neither on (1, on, true, yes) nor off (0, off, false, no); "
            "the measured-choice cache stays on",
            stacklevel=2,
        )
    return value not in _OFF


def cache_dir() -> Path | None:
    """The cache's folder; None where there is none to use (the cache is off, or there is no home folder)."""
    if not enabled():
        return None
    if os.environ.get("UNETX_CACHE_DIR"):
        return Path(os.environ["UNETX_CACHE_DIR"]).expanduser()
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no HOME and no passwd entry (some containers)
        return None
    return Path(base) / "unetx"


def machine() -> dict:
    """What a choice depends on beyond its key: the CPU, torch and the extension's build."""
    cpu, flags = platform.processor() or platform.machine(), ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    ext = Path(_C.__file__)
    st = ext.stat()
    return dict(cpu=cpu, cpu_flags=flags, torch=torch.__version__, extension=f"{ext} {st.st_size} {st.st_mtime_ns}")


def cache_path() -> Path | None:
    """This machine and build's file (which may not exist yet); None where the cache is off or has no folder."""
    folder = cache_dir()
    if folder is None:
        return None
    m = machine()
    where = dict(cpu=m["cpu"], cpu_flags=m["cpu_flags"], extension=m["extension"].rsplit(" ", 2)[0])
    digest = hashlib.sha256(json.dumps(where, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"algo-choices-{digest}.json"


class _Stale(Exception):
    """The file was written for another build of the extension or another torch."""


def _read(path: Path) -> list[dict]:
    """The file's decisions; raises _Stale, or OSError or ValueError where it cannot be read."""
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
    if path is None or not path.exists():
        return 0
    try:
        decisions = _read(path)
    except _Stale:
        return 0
    except (OSError, ValueError) as e:
        warnings.warn(
            f"unetx: ignoring the measured-choice cache {path} ({e}); this process measures its own choices and "
            "rewrites the file (UNETX_ALGO_CACHE=0 turns the cache off)",
            stacklevel=2,
        )
        return 0
    return _C.load_algo_choices(decisions)


def save() -> Path | None:
    """Write this process's new measurements, merged with the file's current content; the file, or None where there
    was nothing new (or the cache is off)."""
    path = cache_path()
    mine = [d for d in _C.algo_choices() if not d["loaded"]]
    if path is None or not mine:
        return None
    merged = {}
    with contextlib.suppress(OSError, ValueError, _Stale):
        merged = {(d["family"], d["key"]): d for d in _read(path)}
    for d in mine:
        merged[d["family"], d["key"]] = {k: d[k] for k in ("family", "key", "chosen", "seconds")}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            tmp = f.name
            json.dump(dict(format=_FORMAT, machine=machine(), decisions=sorted(merged.values(), key=_order)), f)
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        print(
            f"unetx: could not save the measured choices to {path} ({e}); the next process measures them again "
            "(UNETX_CACHE_DIR=DIR puts the cache elsewhere, UNETX_ALGO_CACHE=0 turns it off)",
            file=sys.stderr,
        )
        return None
    return path


def _order(d: dict) -> tuple[str, str]:
    return d["family"], d["key"]


def install() -> None:
    """load() now and save() at exit (`import unetx` calls this once)."""
    load()
    atexit.register(save)
