"""The training planner (unetx.app.plan) and `unetx train --time`: durations, the dataset fingerprint, the plan's rules,
and real CLI runs that must end within their budget, show and write their plan, obey every flag given, and keep
the plan on --resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from unetx import synthetic
from unetx.app.data import InputError, Sample
from unetx.app.plan import Fingerprint, choose_crop_depth, fingerprint, format_duration, parse_duration


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("10m", 600),
        ("90s", 90),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2.5m", 150),
        ("600", 600),
        (" 45s ", 45),
        ("10min", 600),
        (30, 30),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten", "", "0", "0s", "-5m", "inf", "nan", "10x", "m"])
def test_parse_duration_refuses_with_the_option_and_an_example(text):
    with pytest.raises(InputError, match=r"--time .*10m"):
        parse_duration(text)


def test_format_duration():
    assert format_duration(65) == "1:05" and format_duration(3725) == "1:02:05" and format_duration(-3) == "0:00"


def _disc_samples(radius: int, n: int = 4, size: int = 256) -> list[Sample]:
    yy, xx = np.mgrid[:size, :size]
    target = np.zeros((size, size), np.uint8)
    step = 4 * radius
    for cy in range(step // 2, size, step):
        for cx in range(step // 2, size, step):
            target[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
    return [Sample(f"s{i}", np.zeros((1, size, size), np.float32), target) for i in range(n)]


@pytest.mark.parametrize("radius", [5, 12])
def test_fingerprint_measures_object_size_and_balance(radius):
    fp = fingerprint(_disc_samples(radius), 2)
    # the discs' equivalent diameter (the background is one region among many discs)
    assert abs(fp.object_diameter - 2 * radius) <= 2, fp
    assert fp.images == 4 and fp.channels == 1 and fp.min_side == 256 and fp.median_size == (256, 256)
    assert abs(sum(fp.class_fractions) - 1) < 1e-3
    disc_area = np.pi * radius**2 / (4 * radius) ** 2
    assert abs(fp.class_fractions[1] - disc_area) < 0.05


def test_crop_and_depth_follow_object_size_and_image_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fp = lambda d, side=1024: Fingerprint(4, 1, (side, side), side, [0.5, 0.5], d)
    assert choose_crop_depth(fp(10), cpu, None, None) == (128, 4)  # at least 128 px
    assert choose_crop_depth(fp(30), cpu, None, None) == (192, 4)  # ~6 diameters of context
    assert choose_crop_depth(fp(60), cpu, None, None) == (256, 4)  # at most 256 px on a CPU
    assert choose_crop_depth(fp(200), cuda, None, None) == (512, 5)  # 512 px, 5 levels on a GPU
    assert choose_crop_depth(fp(60, side=150), cpu, None, None) == (128, 4)  # never larger than the images
    assert choose_crop_depth(fp(60, side=64), cpu, None, None) == (64, 3)  # the bottleneck keeps >= 8 px
    assert choose_crop_depth(fp(60), cpu, 64, 2) == (64, 2)  # given values are kept


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("cells"), n_train=8, n_val=2, size=64, large=0, seed=4)


def _train(*args, timeout=300):
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "unetx", "train", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    return p, time.perf_counter() - t0


def _data_args(cells):
    return [
        "--images",
        cells["train_images"],
        "--masks",
        cells["train_masks"],
        "--val-images",
        cells["val_images"],
        "--val-masks",
        cells["val_masks"],
        "--no-progress",
    ]


def test_time_budget_run_ends_on_time_with_its_plan_shown_and_written(cells, tmp_path):
    out = tmp_path / "run"
    # a tiny network (base 4); the rest is planned
    p, wall = _train(*_data_args(cells), "--out", out, "--time", "20s", "--base-channels", "4")
    assert p.returncode == 0, p.stdout + p.stderr
    # the whole command, Python's start-up and the last validation and checkpoint included
    assert wall <= 20 + 5, (wall, p.stdout)
    assert "the plan (budget 20s" in p.stdout and "network: base 4 (given)" in p.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budget_s"] == 20 and set(plan["planned"]) >= {"crop", "depth", "batch_size", "patches_per_image"}
    assert plan["values"]["crop"] <= 64 and plan["probe"] and plan["explanation"]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["depth"] == plan["values"]["depth"]
    assert ckpt["train_args"]["time"] == "20s" and 0 < ckpt["time_spent"] <= 20
    lr = np.genfromtxt(out / "history.csv", delimiter=",", names=True)["lr"]
    assert np.all(np.diff(np.atleast_1d(lr)) <= 0)  # the cosine over the budget only goes down
    assert (out / "best.pt").is_file() and (out / "curves.png").is_file()


def test_every_planned_value_yields_to_its_flag(cells, tmp_path):
    out = tmp_path / "run"
    given = {"base_channels": 4, "depth": 2, "crop": 32, "batch_size": 3, "patches_per_image": 2, "val_every": 2}
    flags = [x for k, v in given.items() for x in ("--" + k.replace("_", "-"), v)]
    p, _ = _train(*_data_args(cells), "--out", out, "--time", "25s", *flags)
    assert p.returncode == 0, p.stdout + p.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert not set(given) & set(plan["planned"]), plan["planned"]
    assert {k: plan["values"][k] for k in given} == given
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["base_channels"] == 4 and ckpt["config"]["depth"] == 2
    assert {k: ckpt["train_args"][k] for k in given} == given
    assert "base 4 (given)" in p.stdout and "32 px (given)" in p.stdout


def test_epochs_without_time_plans_sizes_but_not_the_length(cells, tmp_path):
    out = tmp_path / "run"
    p, _ = _train(*_data_args(cells), "--out", out, "--epochs", "1", "--base-channels", "4")
    assert p.returncode == 0, p.stdout + p.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budget_s"] is None and "epochs" not in plan["planned"] and "crop" in plan["planned"]
    assert plan["values"]["epochs"] == 1
    # patches per image left to the data (no budget to size them by): said in words, not as "None"
    assert plan["values"]["patches_per_image"] is None
    assert "as many per image per epoch as cover its area" in p.stdout and "None" not in p.stdout, p.stdout


def test_resume_keeps_the_plan_and_the_budget_spent(cells, tmp_path):
    out = tmp_path / "run"
    p, _ = _train(*_data_args(cells), "--out", out, "--time", "15s", "--base-channels", "4")
    assert p.returncode == 0, p.stdout + p.stderr
    first = torch.load(out / "last.pt", weights_only=True)
    plan_before = (out / "plan.json").read_text()
    p, _ = _train("--resume", out, "--time", "30s", "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "planning" not in p.stdout  # no new probe: the run's own plan
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["config"] == first["config"] and last["epoch"] > first["epoch"]
    assert {k: last["train_args"][k] for k in ("crop", "batch_size", "depth", "patches_per_image")} == {
        k: first["train_args"][k] for k in ("crop", "batch_size", "depth", "patches_per_image")
    }
    assert first["time_spent"] < last["time_spent"] <= 30
    assert (out / "plan.json").read_text() == plan_before


def test_a_budget_too_short_to_train_is_refused_before_anything_is_written(cells, tmp_path):
    out = tmp_path / "run"
    p, _ = _train(*_data_args(cells), "--out", out, "--time", "1s", "--base-channels", "4")
    assert p.returncode != 0
    assert "--time 1s" in p.stderr and "longer --time" in p.stderr and "Traceback" not in p.stderr
    assert not (out / "last.pt").exists()
