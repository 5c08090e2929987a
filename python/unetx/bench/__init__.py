"""unetx against stock PyTorch, side by side: the model-level benchmark behind `unetx bench` and bench/report.py.
Installed with the package (a wheel has no bench/ folder), in small modules:

  workloads.py  named workloads, forms        cases.py    one form of one workload, ready to time
  measure.py    interleaved timing, memory    convs.py    the convolution floor (recorded and replayed)
  runner.py     run(): one workload, all forms table.py    the comparison table, the plot
  profile.py    where a step's time goes     cli.py      `unetx bench` / `python -m unetx.bench`
  flops.py      the work per step, the GEMM rate


Every measurement is a pair. The same network (same weights, same inputs) runs as `unetx.UNet` and as
`unetx.reference.UNet` (stock torch.nn modules) in several forms each: eager NCHW, eager channels_last,
`torch.compile` and, for inference, `torch.compile` with freezing. All forms of one measurement are timed in the
same process, interleaved round by round, and the median is reported. The ratios compare unetx's fastest form
with stock PyTorch's fastest form.

Measured per workload:
  train      one training step: forward, cross-entropy loss, backward, Adam step
  eval       one inference forward (no_grad)
  saved      bytes autograd saves for backward during one training forward (distinct storages; activations
             only, and with the parameters counted too)
  peak       peak allocated device memory of one training step (CUDA only)
  convs      the convolutions of unetx's training step alone: the same convolution forward and backward calls
             (shapes, layouts, output masks) replayed through unetx's fused op with no input stage, statistics or
             ReLU, so each runs as the step runs it (unetx's Winograd, transposed-convolution and weight-gradient
             kernels or oneDNN's, as measured per shape); the floor unetx can approach
  GFLOP/s    the step's convolution work (torch.utils.flop_counter) over its time, beside the rate of a large
             torch.mm in the step's dtype on the same machine (the GEMM library's practical peak)

    python -m unetx.bench --device cpu --size 128          # quick: eager forms, under a minute on 2 cores
    python -m unetx.bench --workload CPU-S --compile       # a named workload, with torch.compile forms
"""

from __future__ import annotations

from .cases import Case, _inputs
from .cli import add_arguments, build_parser, main, run_args
from .convs import ConvRecorder, conv_replay, record_convs
from .flops import gemm_rate, step_flops
from .measure import median, median_ms, peak_allocated, saved_bytes, time_interleaved
from .profile import format_profile, profile_step
from .runner import machine_info, run
from .table import format_across_precisions, format_table, not_measured_table, plot, summary
from .workloads import _LAYOUT_LABEL, LAYOUTS, WORKLOADS, BenchConfigError, Form, Workload, default_forms

__all__ = [
    "LAYOUTS",
    "WORKLOADS",
    "_LAYOUT_LABEL",
    "BenchConfigError",
    "Case",
    "ConvRecorder",
    "Form",
    "Workload",
    "_inputs",
    "add_arguments",
    "build_parser",
    "conv_replay",
    "default_forms",
    "format_across_precisions",
    "format_profile",
    "format_table",
    "gemm_rate",
    "machine_info",
    "main",
    "median",
    "median_ms",
    "not_measured_table",
    "peak_allocated",
    "plot",
    "profile_step",
    "record_convs",
    "run",
    "run_args",
    "saved_bytes",
    "step_flops",
    "summary",
    "time_interleaved",
]
