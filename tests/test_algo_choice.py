"""The measured-choice cache (python/unetx/ops/algo_choice.py, csrc/cpu/algo_choice.h load_algo_choices): real
processes, each with its own cache folder (conftest turns the cache off for every other test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import unetx

# One process: import unetx, report the loaded choices, run a conv_bn_relu layer forward and backward at the given
# size (its convolution passes measure their candidates, or run what was loaded), report the choices again.
WORKER = r"""
import json, sys, torch, unetx
torch.set_num_threads(1)
before = unetx._C.algo_choices()
size = int(sys.argv[1])
cl = torch.channels_last  # where unetx measures (planar layers run ATen's convolutions)
x = torch.randn(2, 16, size, size).contiguous(memory_format=cl).requires_grad_()
w = torch.randn(16, 16, 3, 3).contiguous(memory_format=cl).requires_grad_()
y = unetx.ops.conv_bn_relu(x, w, None)[0]
y.sum().backward()
print(json.dumps(dict(path=str(unetx.ops.algo_choice.cache_path()), before=before, after=unetx._C.algo_choices())))
"""


def run(cache: Path | None, size: int = 12, off: bool = False, switch: str | None = None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNETX_")}
    env["UNETX_ALGO_CACHE"] = switch or ("off" if off else "1")
    if cache is not None:
        env["UNETX_CACHE_DIR"] = str(cache)
    r = subprocess.run(
        [sys.executable, "-c", WORKER, str(size)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def ids(decisions) -> set[tuple[str, str, str]]:
    return {(d["family"], d["key"], d["chosen"]) for d in decisions}


def test_a_second_process_runs_the_first_ones_choices_without_measuring(tmp_path):
    first, _ = run(tmp_path)
    path = Path(first["path"])
    assert path.parent == tmp_path and path.is_file()
    assert first["before"] == [] and first["after"], "the layer's convolution passes measured nothing"
    assert not any(d["loaded"] for d in first["after"])
    saved = json.loads(path.read_text())
    assert ids(saved["decisions"]) == ids(first["after"])
    mtime = path.stat().st_mtime_ns

    second, _ = run(tmp_path)
    assert ids(second["before"]) == ids(first["after"]) and all(d["loaded"] for d in second["before"])
    # the layer ran the loaded winners: nothing measured again (a measured key would come back with loaded False)
    assert ids(second["after"]) == ids(first["after"]) and all(d["loaded"] for d in second["after"])
    assert path.stat().st_mtime_ns == mtime, "rewritten though nothing new was measured"

    # another size: its keys are measured and merged into the file beside the first size's
    third, _ = run(tmp_path, size=20)
    new = [d for d in third["after"] if not d["loaded"]]
    assert new and all(",20,20" in d["key"] for d in new)
    assert ids(json.loads(path.read_text())["decisions"]) == ids(first["after"]) | ids(new)


def test_off_neither_reads_nor_writes(tmp_path):
    out, _ = run(tmp_path, off=True)
    assert out["path"] == "None" and out["after"] and not list(tmp_path.iterdir())
    run(tmp_path)  # writes
    again, _ = run(tmp_path, off=True)
    assert again["before"] == [] and not any(d["loaded"] for d in again["after"])


def test_an_unknown_switch_value_is_named_and_the_cache_stays_on(tmp_path):
    out, err = run(tmp_path, switch="maybe")
    assert "UNETX_ALGO_CACHE='maybe'" in err and Path(out["path"]).is_file()


def test_an_unparsable_file_is_reported_once_and_rewritten(tmp_path):
    path = Path(run(tmp_path)[0]["path"])
    path.write_text('{"format": 1, "machine": {}, "decisions": [tru')
    out, err = run(tmp_path)
    assert "could not be parsed" in err and str(path) in err
    assert out["before"] == [] and out["after"]
    assert ids(json.loads(path.read_text())["decisions"]) == ids(out["after"])
    assert "could not be parsed" not in run(tmp_path)[1]


@pytest.mark.parametrize("field", ["torch", "build"])
def test_a_file_of_another_torch_or_build_is_measured_again_quietly(tmp_path, field):
    first, _ = run(tmp_path)
    path = Path(first["path"])
    data = json.loads(path.read_text())
    data["machine"][field] = "another"
    data["decisions"].append(dict(family="weight_grad", key="stale", chosen="gemm", seconds={"gemm": 1.0}))
    path.write_text(json.dumps(data))
    out, err = run(tmp_path)
    assert "unetx:" not in err
    assert out["before"] == [] and not any(d["loaded"] for d in out["after"])
    rewritten = json.loads(path.read_text())
    assert rewritten["machine"]["torch"] == torch.__version__ and rewritten["machine"][field] != "another"
    assert ids(rewritten["decisions"]) == ids(out["after"]), "a stale decision survived the rewrite"


def test_a_choice_made_among_other_candidates_is_measured_again(tmp_path):
    first, _ = run(tmp_path)
    path = Path(first["path"])
    data = json.loads(path.read_text())
    changed = data["decisions"][0]
    assert len(changed["seconds"]) > 1
    loser = next(n for n in changed["seconds"] if n != changed["chosen"])
    del changed["seconds"][loser]  # as if measured where that candidate did not exist (UNETX_WINOGRAD=0, an old build)
    path.write_text(json.dumps(data))
    out, _ = run(tmp_path)
    after = {(d["family"], d["key"]): d for d in out["after"]}
    again = after[changed["family"], changed["key"]]
    assert not again["loaded"] and loser in again["seconds"]
    assert all(d["loaded"] for k, d in after.items() if k != (changed["family"], changed["key"]))


def test_a_cache_file_that_cannot_be_read_costs_notices_not_the_run(tmp_path):
    path = Path(run(tmp_path)[0]["path"])
    path.unlink()
    path.mkdir()  # reading it fails with an OSError other than "not found" (as a permission error would)
    out, err = run(tmp_path)
    assert out["after"] and not any(d["loaded"] for d in out["after"])
    assert f"could not read the measured-choice cache {path}" in err and "could not save" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any folder")
def test_an_unsearchable_folder_costs_a_notice_not_the_import(tmp_path):
    run(tmp_path)
    tmp_path.chmod(0)
    try:
        out, err = run(tmp_path)
    finally:
        tmp_path.chmod(0o700)
    assert out["after"] and "could not read the measured-choice cache" in err


def test_an_unwritable_folder_costs_a_notice_not_the_run(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out, err = run(blocker)  # the cache folder is a file: it cannot be made
    assert out["after"] and "could not save the measured choices" in err and "UNETX_ALGO_CACHE=0" in err


@pytest.fixture
def clean_choices():
    unetx._C.clear_algo_choices()
    yield
    unetx._C.clear_algo_choices()


def test_load_algo_choices_takes_well_formed_undecided_keys_only(clean_choices):
    ok = dict(family="test", key="a", chosen="y", seconds={"x": 2.0, "y": 1.0, "z": None})
    taken = unetx._C.load_algo_choices(
        [ok, dict(ok, key="b", chosen="w"), dict(ok, key="a", chosen="x")]  # w: not a candidate; a: decided already
    )
    assert taken == 1
    assert unetx._C.algo_choices() == [dict(ok, loaded=True)]
    with pytest.raises((KeyError, RuntimeError, TypeError)):
        unetx._C.load_algo_choices([dict(family="test", key="c", chosen="x")])  # no seconds
    assert len(unetx._C.algo_choices()) == 1, "a malformed list was taken in part"
