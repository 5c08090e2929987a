"""`unetx bench` run as a user runs it (a subprocess), on a tiny configuration: the table has every row, the JSON
holds every form's samples, and every form computed the same logits. No timing is asserted: speed lives in bench/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # subprocesses beside pytest: avoid OpenMP oversubscription


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unetx.bench", *args], capture_output=True, text=True, env=ENV, timeout=600
    )


def test_bench_tiny_config_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    p = run_bench(
        "--size",
        "32",
        "--base-channels",
        "4",
        "--depth",
        "2",
        "--batch",
        "2",
        "--rounds",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--json",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    for row in (
        "Training step (fwd + loss + bwd + Adam)",
        "Eval forward (no_grad)",
        "Bytes saved for backward, activations only",
        "Training step / its convolutions alone",
        "Achieved GFLOP/s, training step",
        "Achieved GFLOP/s, eval forward",
    ):
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
        assert {
            "stock eager NCHW",
            "stock eager channels_last",
            "unetx eager NCHW",
            "unetx eager channels_last",
        } <= names, names
        assert any(n.startswith("unetx convolutions only") for n in names), names
        for n, e in forms.items():
            assert len(e["samples"]) == 1 and e["median_s"] > 0, (task, n, e)
    # every eval form computes the same network on the same weights and input
    for n, e in r["tasks"]["eval"].items():
        if "max_rel_diff_to_stock" in e:
            assert e["max_rel_diff_to_stock"] < 1e-3, (n, e["max_rel_diff_to_stock"])
    assert 0 < r["flops"]["eval"] < r["flops"]["train"] and r["gemm"]["dtype"] == "float32" and r["gemm"]["gflops"] > 0
    saved = r["saved"]
    unetx_act = min(v["activations"] for k, v in saved.items() if k.startswith("unetx"))
    stock_act = min(v["activations"] for k, v in saved.items() if k.startswith("stock"))
    assert 0 < unetx_act < stock_act


def test_bench_both_precisions_side_by_side(tmp_path):
    """--autocast both: float32 and bfloat16 rows in one table, the CPU's flags named, and the fastest form at either
    precision compared (what a user choosing the fastest thing to run gets)."""
    out = tmp_path / "bench.json"
    tiny = ("--size", "32", "--base-channels", "4", "--depth", "2", "--batch", "2", "--rounds", "1", "--threads", "1")
    p = run_bench(*tiny, "--task", "eval", "--autocast", "both", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "custom float32" in p.stdout and "custom bfloat16" in p.stdout, p.stdout
    assert "CPU flags:" in p.stdout, p.stdout
    across = [ln for ln in p.stdout.splitlines() if ln.startswith("| Eval forward |")]
    assert len(across) == 1 and ("float32)" in across[0] or "bfloat16)" in across[0]), p.stdout
    results = json.loads(out.read_text())
    assert [r["config"]["autocast"] for r in results] == [None, "bfloat16"]
    # the bfloat16 run's ceiling: torch.mm's bfloat16 rate, or float32's where that is faster (bfloat16 emulated),
    # named as such in the table
    gemm = results[1]["gemm"]
    gflops_rows = [ln for ln in p.stdout.splitlines() if "custom bfloat16 | Achieved GFLOP/s" in ln]
    assert len(gflops_rows) == 1, p.stdout
    if "emulated" in gemm:
        assert gemm["dtype"] == "float32" and gemm["emulated"]["dtype"] == "bfloat16", gemm
        assert gemm["emulated"]["gflops"] < gemm["gflops"], gemm
        assert "float32's, the faster here: torch.mm in bfloat16 reaches" in gflops_rows[0], gflops_rows[0]
    else:
        assert gemm["dtype"] == "bfloat16" and "the faster here" not in gflops_rows[0], (gemm, gflops_rows[0])
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    assert set(results[0]["machine"]["cpu_flags"]) == flags & {
        "avx2",
        "avx512f",
        "avx512_bf16",
        "amx_bf16",
        "avx512_fp16",
        "amx_fp16",
    }


@pytest.mark.parametrize("bf16_rate, want", [(1.3, "float32"), (300.0, "bfloat16")])
def test_gemm_ceiling_is_the_faster_of_the_dtype_and_float32(monkeypatch, bf16_rate, want):
    """A low-precision run's GEMM ceiling (flops.gemm_rate): float32's where float32's torch.mm is faster (bfloat16
    emulated), named with the slower dtype's own rate; the dtype's where it is faster. The rates are stand-ins for
    the timed ones (this checks the rule and the table's wording, not a timing)."""
    from unetx.bench import flops, table

    rates = {torch.float32: (2048, 150.0), torch.bfloat16: (512, bf16_rate) if bf16_rate < 10 else (2048, bf16_rate)}
    monkeypatch.setattr(flops, "_mm_rate", lambda dev, dt, n, budget_s: rates[dt])
    g = flops.gemm_rate("cpu", "bfloat16")
    assert g["dtype"] == want
    note = table._emulated_note(g)
    if want == "float32":
        assert g["gflops"] == 150.0 and g["emulated"] == dict(dtype="bfloat16", n=512, gflops=1.3), g
        assert "torch.mm in bfloat16 reaches 1.3 GFLOP/s at 512^3" in note, note
    else:
        assert g == dict(dtype="bfloat16", n=2048, gflops=300.0) and note == "", (g, note)
    assert flops.gemm_rate("cpu", None)["dtype"] == "float32"


@pytest.mark.parametrize(
    "argv, autocast, expected",
    [
        ((), None, "CPU-S"),
        (("--autocast", "bfloat16"), "bfloat16", "CPU-S-bf16"),  # the command that checks CPU-S-bf16's targets
        (("--autocast", "both"), "bfloat16", "CPU-S-bf16"),
        (("--autocast", "float16"), "float16", None),
        (("--autocast", "bfloat16", "--size", "128"), "bfloat16", None),
        (("--batch", "2"), None, None),
        (("--depth", "3"), None, None),
        (("--device", "cuda"), None, None),
    ],
)
def test_bench_names_cpu_s_at_either_precision(argv, autocast, expected):
    """`unetx bench` runs CPU-S's network at float32 or bfloat16 as the named workload, whose rows carry its targets;
    anything changed makes it a custom run without them (the tiny runs above show the table side)."""
    from unetx.bench import build_parser
    from unetx.bench.cli import named_workload

    args = build_parser().parse_args(list(argv))
    assert named_workload(args, autocast, configured=args.depth is not None) == expected


PROFILE_WINOGRAD = """
import dataclasses, json
from unetx.bench import WORKLOADS, profile_step
w = dataclasses.replace(WORKLOADS["CPU-S"], name="tiny", batch=2, size=32, config=dict(WORKLOADS["CPU-S"].config,
                        base_channels=8, depth=2))
print(json.dumps(profile_step(w, "unetx", "channels_last", top=1000, threads=1, warmup=1)))
"""


def test_profile_counts_unetx_convolutions_as_convolution():
    """A step whose 3x3 forward convolutions all run Winograd and whose transposed 2x2 and 1x1 convolutions run
    unetx's GEMMs (forced): the profile sees unetx::winograd, unetx::conv_transpose2x2 and unetx::conv1x1 events and
    counts their time as convolution, not as unetx's own work (Winograd fuses the stage and epilogue into the
    kernel)."""
    algos = (
        "conv3x3_forward=winograd4,convT2x2_forward=gemm,convT2x2_input_grad=gemm,weight_grad=gemm,"
        "conv1x1_forward=gemm,conv1x1_input_grad=gemm"
    )
    env = dict(ENV, UNETX_WINOGRAD="1", UNETX_CONV_ALGO=algos)
    p = subprocess.run(
        [sys.executable, "-c", PROFILE_WINOGRAD], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert p.returncode == 0, p.stderr
    prof = json.loads(p.stdout.strip().splitlines()[-1])
    names = ("unetx::winograd", "unetx::conv_transpose2x2", "unetx::conv1x1")
    ours = {r["name"]: r for r in prof["top"] if r["name"] in names}
    assert ours.keys() == set(names), [r["name"] for r in prof["top"]]
    assert ours["unetx::winograd"]["calls"] >= 4
    assert ours["unetx::conv_transpose2x2"]["calls"] == 6  # depth 2: two transposed layers x forward, grads
    assert ours["unetx::conv1x1"]["calls"] == 2  # the head's forward and input gradient; weight_grad=gemm forces
    # the device's own weight-gradient kernel there (csrc/cpu/conv_weight_grad.cpp, any odd k), not the row GEMM
    conv = next(v for k, v in prof["categories"].items() if k.startswith("convolution"))
    assert conv >= sum(r["self_ms"] for r in ours.values()) > 0, prof["categories"]


@pytest.mark.parametrize("size", [32, 34])
def test_step_flops_counts_every_convolution(size):
    """step_flops against a count from the stock twin's own layers (forward hooks on every convolution, the
    direct-convolution formula): eval is the forward's work; a training step adds each layer's weight gradient and,
    but for the first layer (its input needs none), its input gradient, each as much work as the forward. 34 is
    not a multiple of 2**depth: the model pads, and the count follows the padded size."""
    from unetx.bench import WORKLOADS, step_flops
    from unetx.nn import reference

    w = dataclasses.replace(WORKLOADS["CPU-S"], batch=2, size=size, config=dict(WORKLOADS["CPU-S"].config, depth=2))
    model = reference.UNet(**w.config)
    per_layer = []

    def count(mod, inp, out):
        k = mod.weight.shape[2] * mod.weight.shape[3]
        if isinstance(mod, torch.nn.ConvTranspose2d):  # every input pixel scatters a k-tap filter per output channel
            per_layer.append(2 * inp[0].numel() * mod.out_channels * k)
        else:
            per_layer.append(2 * out.numel() * (mod.in_channels // mod.groups) * k)

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            m.register_forward_hook(count)
    with torch.no_grad():
        model.eval()(torch.zeros(w.batch, w.config["in_channels"], size, size))
    assert len(per_layer) > 10
    assert step_flops(w, "eval") == sum(per_layer)
    assert step_flops(w, "train") == 3 * sum(per_layer) - per_layer[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--device", "tpu"), "invalid choice"),
        (("--size", "0"), "--size"),
        (("--depth", "9", "--size", "32"), "unetx bench"),
    ],
)
def test_bench_bad_arguments_exit_with_a_message(args, message):
    p = run_bench(*args, "--quiet")
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# The experiments C++ comments cite (bench/conv_layouts.py, bench/weight_grad.py) in their --quick mode: they run, and
# print their tables; weight_grad's error column (unetx's weight gradient against oneDNN's) is a correctness check.
BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(BENCH_DIR, name), "--quick", "--threads", "1", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def test_conv_layouts_quick():
    p = run_script("conv_layouts.py")
    assert p.returncode == 0, p.stderr
    assert "| layout plan | median s | min s |" in p.stdout
    for plan in ("all NCHW", "all channels_last", "forward channels_last, backward NCHW"):
        assert f"| {plan} |" in p.stdout, p.stdout
    assert "| input | weight | layout | forward ms |" in p.stdout  # --quick prints the per-convolution lines too


def test_weight_grad_quick():
    p = run_script("weight_grad.py")
    assert p.returncode == 0, p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("| [")]
    assert len(rows) == 2, p.stdout
    for row in rows:
        assert float(row.strip("| ").split("|")[-1]) < 1e-4, row


def test_bf16_passes_bench_quick(tmp_path):
    """bench/bf16_passes.py --quick runs every pass in float32 and bfloat16 and writes its rows; no timing is
    asserted (the figures live in BENCHMARKS.md)."""
    out = tmp_path / "passes.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "bf16_passes.py"
    p = subprocess.run(
        [sys.executable, str(script), "--quick", "--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert "| bn_relu |" in p.stdout, p.stdout
    r = json.loads(out.read_text())
    names = {row["name"] for row in r["rows"]}
    assert "floor (ATen copy of the level's activation)" in p.stdout, p.stdout
    assert {
        "floor: ATen copy",
        "bn_relu",
        "bn_relu_pool_backward",
        "upsample_concat_backward bilinear",
        "conv_bn_relu input_stage",
        "conv_bn_relu batch_stats",
        "conv_bn_relu fold_output_grad",
        "conv_bn_relu activation_backward",
        "conv_bn_relu to_planar",
    } <= names, names
    assert all(row["float32_s"] > 0 and row["low_s"] > 0 for row in r["rows"]), r["rows"]


def test_bf16_passes_step_quick_pairs_each_layers_calls(tmp_path):
    """bench/bf16_passes.py --step --quick: whole training steps in float32 and bf16 autocast, each unetx pass's calls
    paired across the precisions by the shapes its event records; no timing is asserted."""
    out = tmp_path / "step.json"
    p = run_script("bf16_passes.py", "--step", "--upsample", "nearest", "--json", str(out))
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    rows = {row["name"]: row for row in r["rows"]}
    for name in ("unetx::activation_backward", "unetx::fold_output_grad", "unetx::upsample_backward"):
        assert rows[name]["kind"] == "pass", rows[name]
        # the same layers run these passes in both precisions: every call is paired, none left over
        assert rows[name]["paired_calls"] > 0, rows[name]
        assert rows[name]["unpaired_float32_calls"] == rows[name]["unpaired_low_calls"] == 0, rows[name]
        assert rows[name]["float32_ms"] > 0 and rows[name]["low_ms"] > 0, rows[name]
    # the convolutions record no shapes: never paired (which of them run is measured, so none is required here)
    convs = [row for row in r["rows"] if row["kind"].startswith("other")]
    assert all(row["paired_calls"] == 0 for row in convs), convs
    assert "passes (paired calls): worst bfloat16/float32 ratio" in p.stdout, p.stdout


def load_bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bf16_passes_pairs_calls_by_shape_and_count():
    """bf16_passes.pair_rounds on made-up rounds: a shape in one precision only, a count that differs, an event
    absent from a round (zero there), an event without shapes (never paired)."""
    pair_rounds = load_bench("bf16_passes").pair_rounds
    a, b, none = "[[4, 32, 64, 64]]", "[[4, 64, 32, 32]]", "[]"
    f32 = [
        {("p", a): (10.0, 2), ("p", b): (4.0, 1), ("q", a): (6.0, 3), ("conv", none): (100.0, 5)},
        {("p", a): (12.0, 2), ("p", b): (4.0, 1), ("conv", none): (90.0, 5)},
        {("p", a): (8.0, 2), ("p", b): (5.0, 1), ("q", a): (6.0, 3), ("conv", none): (80.0, 5)},
    ]
    low = [
        {("p", a): (5.0, 2), ("q", a): (3.0, 2), ("conv", none): (50.0, 5)},
        {("p", a): (6.0, 2), ("p", b): (1.0, 1), ("conv", none): (45.0, 5)},
        {("p", a): (4.0, 2), ("q", a): (3.0, 2), ("conv", none): (40.0, 5)},
    ]
    r = pair_rounds(f32, low)
    # p: shape a paired in every round, shape b in round 1 only (ratios 0.5, 7 / 16, 0.5), b unpaired in 0 and 2
    assert r["p"]["ratio"] == 0.5, r["p"]
    assert r["p"]["paired_calls"] == 2, r["p"]  # median of 2, 3, 2
    assert r["p"]["unpaired_float32_calls"] == 1 and r["p"]["unpaired_low_calls"] == 0, r["p"]
    assert r["p"]["float32_ms"] == 10.0 and r["p"]["unpaired_float32_ms"] == 4.0, r["p"]  # medians of 10/16/8, 4/0/5
    # q: counts differ (3 against 2) and it is absent from round 1: never paired, zero in round 1
    assert r["q"]["paired_calls"] == 0 and r["q"]["ratio"] != r["q"]["ratio"], r["q"]  # NaN: no paired time
    assert r["q"]["unpaired_float32_ms"] == 6.0 and r["q"]["unpaired_low_calls"] == 2, r["q"]
    # conv: same counts every round, but no recorded shapes
    assert r["conv"]["paired_calls"] == 0 and r["conv"]["unpaired_float32_ms"] == 90.0, r["conv"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--upsample", "nearest"], "--upsample nearest applies to --step only (add --step)"),
        (["--step", "--layout", "nchw"], "--layout nchw does not apply to --step (leave it out)"),
        (["--step", "--cache", "hot"], "--cache hot does not apply to --step (leave it out)"),
        (["--rounds", "0"], "--rounds 0: give 1 or more"),
        (["--step", "--weight-grad", "onednn"], "--weight-grad onednn does not apply to --step (leave it out)"),
    ],
)
def test_bf16_passes_refuses_options_that_do_not_apply(args, message):
    p = run_script("bf16_passes.py", *args)
    assert p.returncode == 2 and message in p.stderr, p.stderr


def test_pass_events_record_their_layers_shape():
    """The passes' profiler events carry a tensor of their layer: what bf16_passes.py --step pairs calls by."""
    import unetx
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(2, 6, 10, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(5, 6, 3, 3, requires_grad=True)
    sc, sh, mu = torch.rand(6) + 0.5, torch.randn(6), torch.randn(6) * 0.1
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        y, m, v = unetx.ops.conv_bn_relu(x, w, None, x_scale=sc, x_shift=sh, x_mean=mu, stats=True)
        (y.sum() + m.sum() + v.sum()).backward()
    events = prof.key_averages(group_by_input_shape=True)
    shapes = {e.key: e.input_shapes for e in events if e.key.startswith("unetx::")}
    assert shapes["unetx::activation_backward"] == [[2, 6, 10, 12]], shapes
    assert shapes["unetx::fold_output_grad"] == [[2, 5, 10, 12]], shapes


def test_first_step_bench_quick_second_process_loads_what_the_first_measured():
    """bench/first_step.py --quick: two processes sharing a new choice cache; the second measures nothing."""
    p = run_script("first_step.py")
    assert p.returncode == 0, p.stderr
    rows = [line.split("|")[1:-1] for line in p.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 2, p.stdout + p.stderr
    (measured1, loaded1), (measured2, loaded2) = ((int(r[4]), int(r[5])) for r in rows)
    assert measured1 > 0 and loaded1 == 0, p.stdout + p.stderr
    assert measured2 == 0 and loaded2 == measured1, p.stdout + p.stderr


def test_winograd_bench_quick_runs():
    """bench/winograd.py --quick: both tables, every op row (a smoke test; no timing is checked)."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "winograd.py")
    p = subprocess.run(
        [sys.executable, script, "--quick"], check=False, capture_output=True, text=True, env=ENV, timeout=600
    )
    assert p.returncode == 0, p.stderr
    for row in ("| forward |", "| input grad |", "| weight grad |", "F(4x4), one 4x4 tile", "F(4x4) error (ratio)"):
        assert row in p.stdout, f"missing {row!r} in:\n{p.stdout}"


def test_eval_weights_bench_quick(tmp_path):
    """bench/eval_weights.py --quick: both precisions, kept and folded, and the transforms held (no timing checked)."""
    out = tmp_path / "eval.json"
    p = run_script("eval_weights.py", "--json", str(out))
    assert p.returncode == 0, p.stderr
    for row in ("| float32 |", "| bfloat16 autocast |"):
        assert row in p.stdout, p.stdout
    r = json.loads(out.read_text())
    for name in ("float32", "bfloat16 autocast"):
        assert len(r["rows"][name]["kept"]) == len(r["rows"][name]["folded"]) == 1
    assert r["params"] > 0


def test_perf_step_parses_a_report_into_thread_ms_per_call():
    """bench/perf_step.py's parser on made-up `perf report -F overhead,period,dso,sym` lines of a cpu-clock recording:
    the period (ns) over the calls, oneDNN's JIT code (a dso with spaces) and libgomp's addresses each one row, kernel
    symbols ([k]) kept, header lines skipped."""
    parse = load_bench("perf_step").parse_report
    text = """# Samples: 3K of event 'cpu-clock'
#
    40.00%    1200000000  [JIT] tid 20555                     [.] 0x00007f4974f00032
    10.00%     300000000  [JIT] tid 20555                     [.] 0x00007f4973fc2646
     5.00%     150000000  libgomp.so.1                        [.] 0x000000000001e02a
     5.00%     150000000  libgomp.so.1                        [.] 0x000000000001de62
     2.00%      60000000  _C.cpython-311-x86_64-linux-gnu.so  [.] unetx::cpu::fold_pixels<float>(float const*)
     1.00%      30000000  [kernel.kallsyms]                   [k] clear_page_erms
"""
    t = parse(text, calls=3.0)
    assert t["[JIT] (oneDNN's generated kernels)"] == pytest.approx(1500 / 3)
    assert t["libgomp (threads waiting)"] == pytest.approx(300 / 3)
    assert t["_C.cpython-311-x86_64-linux-gnu.so: unetx::cpu::fold_pixels<float>(float const*)"] == pytest.approx(20)
    assert t["[kernel.kallsyms]: clear_page_erms"] == pytest.approx(10)
    assert len(t) == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seconds", "0"], "--seconds must be > 0, got 0.0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--top", "-3"], "--top must be >= 1, got -3"),
    ],
)
def test_perf_step_refuses_bad_options_before_running_anything(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        load_bench("perf_step").main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
