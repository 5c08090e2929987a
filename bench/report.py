"""The benchmark report: run the named workloads, write one markdown table and one PNG plot per device, and update
BENCHMARKS.md (date, machine, torch version, the exact command) in place.

    python bench/report.py --threads 2 --profile          # CPU-S, CPU-S-bf16, torch.compile forms; ~15 min
    python bench/report.py --device cuda                  # GPU-L (bf16 autocast, channels_last) and GPU-L-fp32

Devices that are not present get their section marked "not measured" (never an estimate). Raw results (every
timing sample) go to bench/results/<device>.json next to the plot <device>.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import sys
from pathlib import Path

import torch
from unetx import bench
from unetx.allocator import keep_freed_memory
from unetx.app.training.setup import cpu_has_native_bf16
from unetx.ops import algo_choice

ROOT = Path(__file__).resolve().parent.parent
DEVICE_WORKLOADS = {"cpu": ["CPU-S", "CPU-S-bf16"], "cuda": ["GPU-L", "GPU-L-fp32"]}
DEVICE_TITLE = {"cpu": "CPU", "cuda": "GPU"}

HEADER = """# Benchmarks: unetx against stock PyTorch

Written by `bench/report.py` (see the command in each section); the sections between the markers are replaced on
every run, the history table grows by one row per run. Method: `python/unetx/bench/__init__.py` (docstring) and below.
"""


def write_atomic(path: Path, text: str | None = None, data: bytes | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if text is not None:
        tmp.write_text(text)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def replace_section(doc: str, key: str, body: str, before: str | None = None) -> str:
    """doc with the text between <!-- BEGIN key --> and <!-- END key --> replaced (the section appended, or put in
    front of the section `before`, when missing)."""
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pat.search(doc):
        return pat.sub(lambda _: block, doc)
    anchor = f"<!-- BEGIN {before} -->" if before else None
    if anchor and anchor in doc:
        return doc.replace(anchor, block + "\n\n" + anchor)
    return doc.rstrip() + "\n\n" + block + "\n"


def section_text(device: str, results: list[dict], png: str, command: str, skipped: list[str] = ()) -> str:
    r0 = results[0]
    m = r0["machine"]
    hw = f"{m['gpu']} (CUDA {m.get('cuda')}), host " if m.get("gpu") else ""
    flags = " ".join(m.get("cpu_flags", [])) or "none of " + ", ".join(bench.runner.SPEED_FLAGS)
    load = ""
    if r0.get("loadavg_before"):
        load = (
            f" Load average (1, 5, 15 min) before {r0['loadavg_before']}, after {results[-1]['loadavg_after']}: "
            f"the machine's {m['cores']} cores are shared, so other processes' work shows up as noise."
        )
    forms = ", ".join(sorted({n for r in results for t in r["tasks"].values() for n in t}))
    lines = [
        f"## {DEVICE_TITLE[device]}",
        "",
        f"Measured {r0['date']} on {hw}{m['cpu']} (CPU flags: {flags}; {m['cores']} cores, "
        f"torch.set_num_threads({m['threads']})), "
        f"torch {m['torch']}, Python {m['python']}, {m['os']}, {m.get('allocator', 'malloc not recorded')}.{load}",
        "",
        "Command: `" + command + "`",
        "",
    ]
    for r in results:
        lines.append(f"- **{r['workload']}**: {r['description']}; median of {r['rounds']} interleaved rounds.")
    lines += [f"- {s}" for s in skipped]
    lines += [
        "",
        bench.format_table(results),
        bench.format_across_precisions(results),
        f"![{device} results]({png})",
        "",
        f"Forms timed: {forms}. Raw samples: `bench/results/{device}.json`.",
    ]
    return "\n".join(lines)


def history_row(r: dict, command: str) -> str:
    rows = {x["measure"]: x for x in bench.summary(r)}

    def get(prefix: str) -> str:
        for k, v in rows.items():
            if k.startswith(prefix):
                return f"{v['ratio']:.2f}"
        return "-"

    m = r["machine"]
    load = f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f}" if r.get("loadavg_before") else "-"
    return (
        f"| {r['date'][:16]} | {r['workload']} | {m.get('gpu') or m['cpu']}, {m['threads']} threads | {load} | "
        f"{m['torch']} | {get('Training step (')} | {get('Eval forward (')} | "
        f"{get('Bytes saved for backward, activations')} | "
        f"{get('Training step /')} | `{command}` |"
    )


def update_history(doc: str, rows: list[str]) -> str:
    head = (
        "## History\n\nHeadline ratios of every report run (speedups: stock best / unetx best; saved: unetx / "
        "stock; floor: unetx training step / its convolutions alone).\n\n"
        "| Date | Workload | Machine | Load before / after | torch | Train speedup | Eval speedup | Saved (act.) "
        "| Step / convs | Command |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    m = re.search(r"<!-- BEGIN history -->\n(.*?)<!-- END history -->", doc, re.S)
    old = [ln for ln in (m.group(1).splitlines() if m else []) if ln.startswith("| 2")]
    return replace_section(doc, "history", head + "\n" + "\n".join(old + rows))


def profile_text(profiles: list[dict], command: str) -> str:
    names = " and ".join(dict.fromkeys(p["workload"] for p in profiles))
    out = [
        f"## Profile: where one {names} training step spends its time",
        "",
        "torch.profiler, one step after two warm-up steps (`bench.profile_step`); self CPU time per op, each "
        "attributed to the nearest categorised op around it (a copy inside a convolution counts as convolution, "
        "inside a unetx op as that op's work). unetx's own kernels run inside its ops, so their time is the self "
        "time of `unetx::*` (backward) and `GeneratedBackwardFor_unetx_*_default` (forward) events. "
        "Command: `" + command + "`.",
        "",
    ]
    for p in profiles:
        out += [bench.format_profile(p), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="which device's workloads to run (default all; an absent device is marked not measured)",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU runs")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile forms (much faster)")
    ap.add_argument(
        "--max-autotune",
        action="store_true",
        help="also torch.compile mode max-autotune (on a small CPU its tuning takes very long)",
    )
    ap.add_argument("--compile-unetx", action="store_true", help="also time unetx under torch.compile")
    ap.add_argument("--profile", action="store_true", help="also profile one training step (unetx and stock)")
    ap.add_argument(
        "--emulated-bf16",
        action="store_true",
        help="also run CPU-S-bf16 on a CPU without native bfloat16 (skipped there by default: hours on 2 cores)",
    )
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    try:
        keep_freed_memory()  # as `unetx bench` and the other commands run, for stock and unetx alike
    except ValueError as e:
        ap.error(str(e))
    algo_choice.measure_afresh()  # as `unetx bench`: this run measures its own convolution choices
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    out, rdir = Path(args.out), Path(args.results_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    doc = out.read_text() if out.exists() else HEADER
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    log = lambda s: print(s, file=sys.stderr, flush=True)
    history = []
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            why = f"no CUDA device on the machine that ran this report, {dt.date.today().isoformat()}"
            body = f"## {DEVICE_TITLE[device]}\n\n" + "\n".join(
                bench.not_measured_table(n, why) for n in DEVICE_WORKLOADS[device]
            )
            doc = replace_section(doc, device, body, before="history")
            log(f"{device}: not measured ({why})")
            continue
        names, skipped = DEVICE_WORKLOADS[device], []
        # the test `unetx train --amp auto` makes: where it trains float32, stock PyTorch and unetx both emulate
        # bf16, many times slower than float32 (BENCHMARKS.md)
        if device == "cpu" and not cpu_has_native_bf16() and not args.emulated_bf16:
            names = [n for n in names if not bench.WORKLOADS[n].autocast]
            skipped.append(
                "**CPU-S-bf16**: not measured: this CPU has no native bfloat16 (neither AVX512_BF16 nor AMX), so "
                "stock PyTorch and unetx both emulate it, many times slower than float32, and `unetx train --amp "
                "auto` trains in float32 here (`--emulated-bf16` measures it anyway)."
            )
            log(skipped[-1])
        results = []
        for name in names:
            log(f"== {name}")
            results.append(
                bench.run(
                    device,
                    workload=name,
                    compile=not args.no_compile,
                    max_autotune=args.max_autotune,
                    compile_unetx=args.compile_unetx,
                    rounds=args.rounds,
                    threads=args.threads if device == "cpu" else None,
                    log=log,
                )
            )
            print(bench.format_table(results[-1]), flush=True)
        for r in results:
            r["command"] = command
        png = rdir / f"{device}.png"
        bench.plot(results, str(png))
        write_atomic(rdir / f"{device}.json", json.dumps(results, indent=1))
        doc = replace_section(
            doc,
            device,
            section_text(device, results, os.path.relpath(png, out.parent), command, skipped),
            before="history",
        )
        history += [history_row(r, command) for r in results]
        if args.profile:  # each workload (each precision): unetx's fastest eager layout and stock channels_last
            profiles = []
            threads = args.threads if device == "cpu" else None
            for r in results:
                best = min(
                    (
                        (n, e["median_s"])
                        for n, e in r["tasks"]["train"].items()
                        if e.get("form", {}).get("impl") == "unetx" and e["form"]["compile"] is None
                    ),
                    key=lambda t: t[1],
                )[0]
                lay = r["tasks"]["train"][best]["form"]["layout"]
                profiles += [
                    bench.profile_step(r["workload"], "unetx", lay, threads=threads),
                    bench.profile_step(r["workload"], "stock", "channels_last", threads=threads),
                ]
            for p in profiles:
                print(bench.format_profile(p), flush=True)
            write_atomic(rdir / f"{device}-profile.json", json.dumps(profiles, indent=1))
            doc = replace_section(doc, f"profile-{device}", profile_text(profiles, command), before="history")
    if history:
        doc = update_history(doc, history)
    write_atomic(out, doc)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
