"""The unetx ops composed as the fused layers compose them, against stock Conv2d / BatchNorm2d / ReLU.

- gradients reach BatchNorm's gamma and beta through the (mean, var) outputs of conv_bn_relu, both in the
  centred form the layers train with (scale = gamma * rsqrt(var + eps), shift = beta, mean) and in the folded
  form of reference.fold_batch_stats;
- the (mean, var) outputs drive BatchNorm's running statistics exactly as nn.BatchNorm2d does;
- torch.compile(fullgraph=True) traces a chain of all five ops (every conv_bn_relu mode) into one graph in which
  AOT autograd keeps each op whole and calls its backward op, with eager's values and gradients.
(Inductor compilation and the saved-for-backward memory of a layer stack: test_ops_compile_memory.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import check_close, device_param, grads_of, leaf, rand, randn
from torch import nn
from unetx import ops
from unetx import reference as ref

EPS = 1e-5


def bn_params(c: int, gen: torch.Generator, dtype, device):
    return rand(c, dtype=dtype, device=device, gen=gen), randn(c, std=0.5, dtype=dtype, device=device, gen=gen)


def weight(cout: int, cin: int, k: int, gen, dtype, device):
    return randn(cout, cin, k, k, std=(cin * k * k) ** -0.5, dtype=dtype, device=device, gen=gen)


# ------------------------------------------------------------------ gradients through BatchNorm's gamma and beta
def two_layers_ops(p: dict, form: str):
    """conv-BN-ReLU -> (pool, concat nearest-upsampled x2) conv-BN-ReLU, on the ops."""
    y1, m1, v1 = ops.conv_bn_relu(p["x"], p["w1"])
    if form == "centred":
        s1, t1, mu1 = p["g1"] * torch.rsqrt(v1 + EPS), p["b1"], m1
    else:
        (s1, t1), mu1 = ref.fold_batch_stats(m1, v1, p["g1"], p["b1"], EPS), None
    y2, m2, v2 = ops.conv_bn_relu(
        y1, p["w2"], x_scale=s1, x_shift=t1, x_mean=mu1, x_pool=True, x2=p["x2"], x2_mode="nearest"
    )
    return ops.bn_relu(y2, p["g2"] * torch.rsqrt(v2 + EPS), p["b2"], m2)


def two_layers_stock(p: dict):
    """The same network in stock ops: F.batch_norm in training mode computes the batch statistics itself."""
    a1 = F.relu(F.batch_norm(F.conv2d(p["x"], p["w1"], padding=1), None, None, p["g1"], p["b1"], True, 0.0, EPS))
    a = torch.cat([F.avg_pool2d(a1, 2), F.interpolate(p["x2"], scale_factor=2, mode="nearest")], dim=1)
    return F.relu(F.batch_norm(F.conv2d(a, p["w2"], padding=1), None, None, p["g2"], p["b2"], True, 0.0, EPS))


def two_layer_params(dtype, device, layout: str, mean_offset: float = 0.0, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(2, 3, 8, 12, dtype=dtype, device=device, gen=gen, mean=mean_offset).contiguous(memory_format=fmt)
    p = dict(
        x=x,
        x2=randn(2, 2, 2, 3, dtype=dtype, device=device, gen=gen).contiguous(memory_format=fmt),
        w1=weight(5, 3, 3, gen, dtype, device),
        w2=weight(7, 7, 3, gen, dtype, device),
    )
    p["g1"], p["b1"] = bn_params(5, gen, dtype, device)
    p["g2"], p["b2"] = bn_params(7, gen, dtype, device)
    return {k: leaf(v) for k, v in p.items()}


@device_param
@pytest.mark.parametrize("form", ["centred", "folded"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_gamma_beta_gradients_match_stock_batchnorm(dtype, layout, form, device):
    p = two_layer_params(dtype, device, layout)
    z = two_layers_ops(p, form)
    exact_p = {k: leaf(v.detach().double()) for k, v in p.items()}
    z_exact = two_layers_stock(exact_p)
    check_close(z, z_exact, dtype, "output")
    gz = randn(*z.shape, gen=torch.Generator().manual_seed(1)).to(device)
    names = list(p)
    for k, a, e in zip(
        names, grads_of([z], [gz], [p[k] for k in names]), grads_of([z_exact], [gz], [exact_p[k] for k in names])
    ):
        check_close(a, e, dtype, f"grad {k}")


# ------------------------------------------------------------------------------------------ running statistics
def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float = 0.1) -> None:
    """What nn.BatchNorm2d does with a training batch's statistics: an exponential moving average of the mean
    and of the unbiased variance."""
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


@device_param
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_running_stats_from_conv_bn_relu_match_batchnorm2d(dtype, layout, device):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=True).to(device=device, dtype=dtype)
    bn = nn.BatchNorm2d(7).to(device=device, dtype=dtype)  # momentum 0.1
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        # batches of different sizes, spreads and offsets (batch 1 included)
        x = randn(1 + step % 3, 5, 7 + step, 9, dtype=dtype, device=device, gen=gen, std=1 + step, mean=step)
        x = x.contiguous(memory_format=fmt)
        with torch.no_grad():
            bn(conv(x))
            y, mean, var = ops.conv_bn_relu(x, conv.weight, conv.bias)
        update_running_stats(running_mean, running_var, mean, var, y.numel() // y.shape[1])
        check_close(running_mean, bn.running_mean, dtype, f"step {step} running_mean")
        check_close(running_var, bn.running_var, dtype, f"step {step} running_var")
    assert not torch.allclose(running_var, torch.ones_like(running_var))  # the statistics did move


# --------------------------------------------------------------------------------------------- torch.compile
def all_ops_chain(x, w1, g1, b1, w2, g2, b2, w3, b3, wt):
    """Every op once: conv_bn_relu (train, pooled input stage, eval with x2 bilinear, transposed), bn_relu_pool,
    fold_batch_stats, bn_relu, upsample_concat, avg_pool2x2."""
    y1, m1, v1 = ops.conv_bn_relu(x, w1)
    s1 = g1 * torch.rsqrt(v1 + EPS)
    skip, pooled = ops.bn_relu_pool(y1, s1, b1, m1)
    y2, m2, v2 = ops.conv_bn_relu(y1, w2, x_scale=s1, x_shift=b1, x_mean=m1, x_pool=True)
    s2, t2 = ref.fold_batch_stats(m2, v2, g2, b2, EPS)
    z2 = ops.bn_relu(y2, s2, t2)
    cat = ops.upsample_concat(skip, z2 + pooled, "nearest")
    y3, _, _ = ops.conv_bn_relu(skip, w3, b3, x2=z2, x2_mode="bilinear", stats=False, relu=True)
    up, _, _ = ops.conv_bn_relu(ops.avg_pool2x2(y3), wt, transposed=True, stats=False)
    return cat, y3, up


def chain_inputs(gen):
    w = lambda co, ci, k: leaf(weight(co, ci, k, gen, torch.float32, "cpu"))
    g1, b1 = bn_params(4, gen, torch.float32, "cpu")
    g2, b2 = bn_params(4, gen, torch.float32, "cpu")
    return [
        leaf(randn(2, 3, 8, 10, gen=gen)),
        w(4, 3, 3),
        leaf(g1),
        leaf(b1),
        w(4, 4, 3),
        leaf(g2),
        leaf(b2),
        w(5, 8, 3),
        leaf(randn(5, gen=gen)),
        leaf(randn(5, 3, 2, 2, std=0.3, gen=gen)),
    ]


OPS = ("conv_bn_relu", "bn_relu", "bn_relu_pool", "avg_pool2x2", "upsample_concat")


def unetx_ops(gm: torch.fx.GraphModule) -> set[str]:
    return {
        str(n.target).split(".")[1]
        for n in gm.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("unetx.")
    }


def compiled_matches_eager(backend) -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    inputs = chain_inputs(gen)
    eager = all_ops_chain(*inputs)
    cots = [randn(*o.shape, gen=gen) for o in eager]
    g_eager = grads_of(eager, cots, inputs)
    compiled_inputs = [leaf(t.detach()) for t in inputs]
    out = torch.compile(all_ops_chain, backend=backend, fullgraph=True)(*compiled_inputs)
    g_comp = grads_of(out, cots, compiled_inputs)
    for i, (a, e) in enumerate(zip(out, eager)):
        check_close(a, e, torch.float32, f"output {i}")
    for i, (a, e) in enumerate(zip(g_comp, g_eager)):
        check_close(a, e, torch.float32, f"grad input {i}")


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")
def test_compile_fullgraph_keeps_the_ops_whole_and_matches_eager():
    """AOT autograd traces each op through its fake impl and autograd formula: one graph (fullgraph=True raises on
    a break), whose forward calls the five ops (not a decomposition) and whose backward calls their backward ops."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    compiled_matches_eager(backend)
    assert len(backend.graphs) == len(backend.fw_graphs) == len(backend.bw_graphs) == 1
    assert unetx_ops(backend.fw_graphs[0]) == set(OPS)
    assert unetx_ops(backend.bw_graphs[0]) == {f"{op}_backward" for op in OPS}
