"""The unetx ops together: under torch.compile(fullgraph=True) (no graph break, same values and gradients as
eager), and the memory they save for backward in a conv-BN-ReLU stack against the same stack in stock modules."""

from __future__ import annotations

import pytest
import torch
import unetx
from conftest import DEVICES, check_close, leaf, rand, randn, to_layout
from torch import nn
from unetx import ops
from unetx import reference as ref
from unetx.nn import Act


def chain(x, w1, w2, gamma1, beta1, gamma2, beta2, eps: float = 1e-5):
    """Every op in one graph: conv_bn_relu -> conv_bn_relu (input stage: centred BN+ReLU of the first, 2x2 pool)
    -> bn_relu; then avg_pool2x2 and upsample_concat (bilinear) of that activation."""
    y1, m1, v1 = ops.conv_bn_relu(x, w1, stats=True)
    y2, m2, v2 = ops.conv_bn_relu(
        y1, w2, x_scale=gamma1 * torch.rsqrt(v1 + eps), x_shift=beta1, x_mean=m1, x_pool=True, stats=True
    )
    z = ops.bn_relu(y2, gamma2 * torch.rsqrt(v2 + eps), beta2, m2)
    return ops.upsample_concat(z, ops.avg_pool2x2(z), "bilinear"), m2, v2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_fullgraph_matches_eager(layout, device):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    dt = torch.float32
    inputs = [
        to_layout(randn(2, 3, 8, 12, gen=gen, device=device), layout),
        randn(5, 3, 3, 3, std=0.3, gen=gen, device=device),
        randn(7, 5, 3, 3, std=0.2, gen=gen, device=device),
        rand(5, gen=gen, device=device),
        randn(5, std=0.5, gen=gen, device=device),
        rand(7, gen=gen, device=device),
        randn(7, std=0.5, gen=gen, device=device),
    ]
    eager_in = [leaf(t) for t in inputs]
    compiled_in = [leaf(t) for t in inputs]
    compiled = torch.compile(chain, fullgraph=True)  # fullgraph: any graph break raises
    out_e, out_c = chain(*eager_in), compiled(*compiled_in)
    assert out_c[0].shape == (2, 14, 4, 6)
    for e, c in zip(out_e, out_c):
        check_close(c, e, dt, "forward")
    cots = [randn(*o.shape, gen=gen, device=device) for o in out_e]
    loss_e = sum((o * c).sum() for o, c in zip(out_e, cots))
    loss_c = sum((o * c).sum() for o, c in zip(out_c, cots))
    g_e = torch.autograd.grad(loss_e, eager_in)
    g_c = torch.autograd.grad(loss_c, compiled_in)
    for i, (e, c) in enumerate(zip(g_e, g_c)):
        check_close(c, e, dt, f"grad of input {i}")


# ------------------------------------------------------------------------------------------------- memory
def saved_for_backward(run, params) -> tuple[int, int]:
    """Bytes of the distinct storages autograd saves while run() builds its graph: (without, with) parameters.

    Deduplicated by storage (a tensor saved by two nodes, or a view of a saved tensor, counts once)."""
    sizes: dict[int, int] = {}
    keep = []  # hold every saved tensor so no storage address is reused while we count

    def pack(t):
        keep.append(t)
        st = t.untyped_storage()
        sizes[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    total = sum(sizes.values())
    without = sum(n for ptr, n in sizes.items() if ptr not in param_ptrs)
    del out
    keep.clear()
    return without, total


@pytest.mark.parametrize("device", DEVICES)
def test_conv_bn_relu_stack_saves_half_of_stock(device):
    """Four conv-BN-ReLU layers chained pending (each layer's input stage applies the previous BN+ReLU) keep one
    activation-sized tensor per layer; Conv2d -> BatchNorm2d -> ReLU keeps two (BN's input and ReLU's output)."""
    torch.manual_seed(0)
    channels = [1, 16, 16, 16, 16]
    stock = nn.Sequential(*[ref.ConvBNReLU(a, b) for a, b in zip(channels, channels[1:])]).to(device)
    ours = nn.ModuleList([unetx.ConvBNReLU(a, b) for a, b in zip(channels, channels[1:])]).to(device)
    ours.load_state_dict({k: v for k, v in stock.state_dict().items()})
    x = torch.randn(4, 1, 48, 48, device=device)

    def run_ours():
        act = Act(x)
        for layer in ours:
            act = layer.pending(act)
        return act.materialize()

    out_stock = stock(x)
    check_close(run_ours(), out_stock, torch.float32, "stack output")
    ours_bytes, ours_with_params = saved_for_backward(run_ours, ours.parameters())
    stock_bytes, stock_with_params = saved_for_backward(lambda: stock(x), stock.parameters())
    ratio = ours_bytes / stock_bytes
    ratio_with_params = ours_with_params / stock_with_params
    print(
        f"saved for backward: unetx {ours_bytes} B, stock {stock_bytes} B, ratio {ratio:.4f} "
        f"(with parameters: {ours_with_params} / {stock_with_params} = {ratio_with_params:.4f})"
    )
    # Measured (CPU, float32, this exact stack): 2396928 / 4756480 = 0.5039 without parameters (4 y's + the input
    # against 4 x (conv output + ReLU output) + the input), 2425664 / 4784960 = 0.5069 with them.
    assert ratio <= 0.5039 + 0.005
    assert ratio_with_params <= 0.5069 + 0.005
