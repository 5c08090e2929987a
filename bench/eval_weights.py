"""An eval forward with the folded weights kept across calls against one that folds them on every call.

In eval, each conv-BN-ReLU layer runs on its weight with BatchNorm folded in (w * gamma / sqrt(var + eps)), cast to
the autocast dtype under autocast, and - where a Winograd forward is chosen - transformed (4x the weight's values
for F(4x4)). unetx.nn.layers keeps the folded weights and ops.hold_weight_transforms the transforms across calls
(KEEP_EVAL_WEIGHTS, default on), until a parameter or running statistic changes. This times a CPU-S eval forward
(no_grad; `unetx bench --task eval`'s workload by default) both ways, float32 and under bf16 autocast, the modes
alternating call by call, and reports the medians, the median of the per-round ratios, and the memory kept (bytes of
the transforms held, beside the parameters' own).

    python bench/eval_weights.py [--threads 2] [--rounds 9] [--batch 4] [--size 256] [--json out.json]
    python bench/eval_weights.py --batch 1 --size 512     # one prediction tile, as `unetx predict` runs them
    python bench/eval_weights.py --quick                  # a tiny model, one round: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import unetx
from bf16_passes import cpu_flags, cpu_name
from unetx.nn import layers


def forward_seconds(model, x, keep: bool, autocast: bool) -> float:
    layers.KEEP_EVAL_WEIGHTS = keep
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.batch, a.size, a.base_channels, a.depth = 1, 1, 32, 4, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = unetx.UNet(1, 2, base_channels=a.base_channels, depth=a.depth).to(memory_format=torch.channels_last)
    with torch.no_grad():  # running statistics of a trained model, not the initial ones
        model.train()
        model(torch.randn(2, 1, a.size, a.size))
    model.eval()
    x = torch.randn(a.batch, 1, a.size, a.size).contiguous(memory_format=torch.channels_last)
    params = sum(q.numel() * q.element_size() for q in model.parameters())
    rows = {}
    for name, autocast in (("float32", False), ("bfloat16 autocast", True)):
        for keep in (True, False, True, False):  # the algorithm choices measured, both modes warm
            forward_seconds(model, x, keep, autocast)
        kept, folded, ratio = [], [], []
        for r in range(a.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            t = {keep: forward_seconds(model, x, keep, autocast) for keep in order}
            kept.append(t[True])
            folded.append(t[False])
            ratio.append(t[False] / t[True])
        layers.KEEP_EVAL_WEIGHTS = True
        forward_seconds(model, x, True, autocast)
        rows[name] = dict(kept=kept, folded=folded, speedup=ratio, held_bytes=unetx.ops.held_weight_transforms()[1])
    layers.KEEP_EVAL_WEIGHTS = True
    print(f"# Eval forward: weights kept vs folded every call ({cpu_name()}; flags {cpu_flags()})")
    print(
        f"UNet(1->2, base {a.base_channels}, depth {a.depth}), batch {a.batch}, {a.size}x{a.size}, no_grad, "
        f"channels_last, {torch.get_num_threads()} threads, torch {torch.__version__}, {a.rounds} rounds; "
        f"parameters {params / 2**20:.1f} MiB\n"
    )
    print("| precision | folded every call | kept | speedup (median of rounds) | transforms held |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {statistics.median(r['folded']) * 1e3:.1f} ms | {statistics.median(r['kept']) * 1e3:.1f} ms "
            f"| {statistics.median(r['speedup']):.2f}x ({min(r['speedup']):.2f}-{max(r['speedup']):.2f}) "
            f"| {r['held_bytes'] / 2**20:.0f} MiB |"
        )
    if a.json:
        meta = dict(cpu=cpu_name(), flags=cpu_flags(), torch=torch.__version__, args=vars(a), params=params)
        with open(a.json, "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
