"""`unetx bench` run as a user runs it (a subprocess), on a tiny configuration: the table has every row, the JSON
holds every form's samples, and every form computed the same logits. No timing is asserted: speed lives in bench/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # subprocesses beside pytest: avoid OpenMP oversubscription


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unetx.bench", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def test_bench_tiny_config_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    p = run_bench("--size", "32", "--base-channels", "4", "--depth", "2", "--batch", "2", "--rounds", "1",
                  "--threads", "1", "--quiet", "--json", str(out))
    assert p.returncode == 0, p.stderr
    for row in ("Training step (fwd + loss + bwd + Adam)", "Eval forward (no_grad)",
                "Bytes saved for backward, activations only", "Training step / its convolutions alone"):
        assert row in p.stdout, f"missing row {row!r} in:\n{p.stdout}"
    # CPU-S's targets are not a custom configuration's: its rows carry none
    for line in p.stdout.splitlines():
        if line.startswith("| Training step") or line.startswith("| Eval forward"):
            assert line.split("|")[3].strip() == "-", line
    r = json.loads(out.read_text())
    assert r["workload"] == "custom" and r["config"]["size"] == 32 and r["config"]["config"]["base_channels"] == 4
    assert not (tmp_path / "bench.json.tmp").exists()
    for task in ("train", "eval"):
        forms = r["tasks"][task]
        names = set(forms)
        assert {"stock eager NCHW", "stock eager channels_last", "unetx eager NCHW",
                "unetx eager channels_last"} <= names, names
        assert any(n.startswith("unetx convolutions only") for n in names), names
        for n, e in forms.items():
            assert len(e["samples"]) == 1 and e["median_s"] > 0, (task, n, e)
    # every eval form computes the same network on the same weights and input
    for n, e in r["tasks"]["eval"].items():
        if "max_rel_diff_to_stock" in e:
            assert e["max_rel_diff_to_stock"] < 1e-3, (n, e["max_rel_diff_to_stock"])
    saved = r["saved"]
    unetx_act = min(v["activations"] for k, v in saved.items() if k.startswith("unetx"))
    stock_act = min(v["activations"] for k, v in saved.items() if k.startswith("stock"))
    assert 0 < unetx_act < stock_act


@pytest.mark.parametrize("args, message", [
    (("--device", "tpu"), "invalid choice"),
    (("--size", "0"), "--size"),
    (("--depth", "9", "--size", "32"), "unetx bench"),
])
def test_bench_bad_arguments_exit_with_a_message(args, message):
    p = run_bench(*args, "--quiet")
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_winograd_bench_quick_runs():
    """bench/winograd.py --quick: both tables, every op row (a smoke test; no timing is checked)."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "winograd.py")
    p = subprocess.run([sys.executable, script, "--quick"], check=False, capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    for row in ("| forward |", "| input grad |", "| weight grad |", "F(4x4) error (ratio)"):
        assert row in p.stdout, f"missing {row!r} in:\n{p.stdout}"
