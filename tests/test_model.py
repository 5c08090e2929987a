"""unetx.UNet against its plain-PyTorch twin unetx.reference.UNet: same weights, outputs, gradients, running stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import unetx
from conftest import randomise_batchnorm
from unetx import reference as ref

CONFIGS = [
    dict(pool="avg", upsample="transpose"),
    dict(pool="max", upsample="transpose"),
    dict(pool="avg", upsample="nearest"),
    dict(pool="avg", upsample="bilinear", dropout=0.0),
    dict(pool="max", upsample="bilinear"),
]


def pair(in_ch=1, out_ch=3, base=6, depth=3, seed=0, **kw):
    torch.manual_seed(seed)
    r = ref.UNet(in_ch, out_ch, base_channels=base, depth=depth, **kw)
    randomise_batchnorm(r)
    return r, unetx.UNet.from_reference(r)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_reference_train_and_eval(cfg, layout):
    r, u = pair(**cfg)
    x = torch.randn(2, 1, 37, 45)  # not a multiple of 2**depth: padded and cropped back
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        r, u = r.to(memory_format=torch.channels_last), u.to(memory_format=torch.channels_last)
    for _step in range(3):  # several steps: running statistics must track
        for train in (True, False):
            r.train(train)
            u.train(train)
            xr, xu = x.clone().requires_grad_(), x.clone().requires_grad_()
            a, b = r(xr), u(xu)
            assert b.shape == a.shape == (2, 3, 37, 45)
            assert max_rel(b, a) < 1e-4
            g = torch.randn_like(a)
            a.backward(g)
            b.backward(g)
            assert max_rel(xu.grad, xr.grad) < 1e-3
            for (name, p1), p2 in zip(r.named_parameters(), u.parameters()):
                assert max_rel(p2.grad, p1.grad) < 2e-3, name
            r.zero_grad()
            u.zero_grad()
    for (name, b1), b2 in zip(r.named_buffers(), u.buffers()):
        torch.testing.assert_close(b2, b1, rtol=1e-5, atol=1e-6, msg=name)


def test_state_dict_is_identical_and_loads_both_ways():
    r, u = pair(base=4, depth=2)
    assert list(r.state_dict().keys()) == list(u.state_dict().keys())
    for k, v in r.state_dict().items():
        assert u.state_dict()[k].shape == v.shape
    # stock -> unetx -> stock keeps every tensor
    back = u.to_reference()
    assert isinstance(back, ref.UNet)
    for k, v in r.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    fresh = unetx.UNet(1, 3, base_channels=4, depth=2)
    fresh.load_state_dict(r.state_dict())
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(fresh.eval()(x), r.eval()(x), rtol=1e-4, atol=1e-5)


def test_seed_design_is_expressible():
    """The study note's network: 3x3 conv+BN+ReLU, avg pooling, dropout 0.02, nearest upsampling + conv,
    concatenated skips, 3-channel output."""
    m = unetx.UNet(
        in_channels=1, out_channels=3, base_channels=8, depth=4, pool="avg", upsample="nearest", dropout=0.02
    )
    x = torch.randn(2, 1, 64, 48)
    out = m(x)
    assert out.shape == (2, 3, 64, 48)
    loss = F.mse_loss(torch.sigmoid(out), torch.rand_like(out))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_dropout_is_active_in_training_only():
    _, u = pair(base=4, depth=2, dropout=0.5)
    x = torch.randn(2, 1, 16, 16)
    u.eval()
    torch.testing.assert_close(u(x), u(x))
    u.train()
    torch.manual_seed(1)
    a = u(x)
    torch.manual_seed(2)
    b = u(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (17, 31), (64, 64)])
def test_any_input_size(size):
    r, u = pair(base=4, depth=3)
    r.eval()
    u.eval()
    x = torch.randn(1, 1, *size)
    out = u(x)
    assert out.shape[-2:] == size
    torch.testing.assert_close(out, r(x), rtol=1e-4, atol=1e-5)


def test_batch_one_train_mode():
    r, u = pair(base=4, depth=2)
    x = torch.randn(1, 1, 24, 20)
    torch.testing.assert_close(u(x), r(x), rtol=1e-4, atol=1e-4)


def test_cpu_autocast_bf16_close_to_float32_reference():
    r, u = pair(base=8, depth=2)
    x = torch.randn(2, 1, 32, 32)
    r64 = ref.UNet(**r.config).double()
    r64.load_state_dict(r.state_dict())
    exact = r64(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = u(x)
        stock = r(x)
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.double() - exact).abs().max().item()
    err_stock = (stock.double() - exact).abs().max().item()
    # flash-attention style bar: not much worse than stock PyTorch at the same precision
    assert err_ours <= 2 * err_stock + 1e-2, (err_ours, err_stock)
    ours.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in u.parameters())


def test_float64_model():
    r, u = pair(base=4, depth=2)
    r, u = r.double(), u.double()
    x = torch.randn(2, 1, 20, 20, dtype=torch.float64)
    torch.testing.assert_close(u(x), r(x), rtol=1e-10, atol=1e-10)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    r, u = pair(base=4, depth=2)
    compiled = torch.compile(u, fullgraph=True)
    x = torch.randn(2, 1, 16, 16)
    eager_out = u(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in u.parameters()]
    u.zero_grad()
    out = compiled(x)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    for g1, p in zip(eager_grads, u.parameters()):
        torch.testing.assert_close(p.grad, g1, rtol=1e-3, atol=1e-4)
    u.eval()  # eval recompiles (BatchNorm folded into the convolutions); must still match eager
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), u(x), rtol=1e-4, atol=1e-5)


def saved_bytes(model, x, include_parameters: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if include_parameters or st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_memory_saved_for_backward_is_at_most_055_of_stock():
    # the default configuration (avg pool, transposed-conv upsampling) at a realistic size
    r, u = pair(in_ch=1, out_ch=2, base=16, depth=4)
    x = torch.randn(2, 1, 128, 128)
    act_ratio = saved_bytes(u, x, False) / saved_bytes(r, x, False)
    all_ratio = saved_bytes(u, x, True) / saved_bytes(r, x, True)
    # measured 2026-11-24: activations 0.4897, with the (shared) weights counted too 0.5711 at this small size
    assert act_ratio <= 0.55, act_ratio
    assert all_ratio <= 0.60, all_ratio


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_onnx_export_of_reference_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    _, u = pair(base=4, depth=2)
    m = u.eval().to_reference()
    x = torch.randn(1, 1, 32, 32)
    path = tmp_path / "unet.onnx"
    torch.onnx.export(m, (x,), str(path), input_names=["image"], output_names=["logits"], dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), u(x).detach(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------- bad input
def test_bad_input_messages():
    u = unetx.UNet(in_channels=3, out_channels=2, base_channels=4, depth=2)
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 1"):
        u(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"4-D input.*got shape \(3, 16, 16\).*unsqueeze"):
        u(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match=r"floating-point input, got torch.uint8"):
        u(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(pool="median"), r"pool must be 'avg' or 'max', got 'median'"),
        (dict(upsample="pixelshuffle"), r"upsample must be .* got 'pixelshuffle'"),
        (dict(depth=0), r"depth .* got 0"),
        (dict(base_channels=-4), r"base_channels must be a positive int, got -4"),
        (dict(dropout=1.5), r"dropout must be a probability .* got 1.5"),
    ],
)
def test_bad_config_messages(kw, msg):
    with pytest.raises(ValueError, match=msg):
        unetx.UNet(**kw)


def test_state_dict_from_other_config_is_a_clear_error():
    a = unetx.UNet(1, 2, base_channels=4, depth=2)
    b = unetx.UNet(1, 2, base_channels=8, depth=2)
    with pytest.raises(ValueError, match=r"different configuration"):
        a.load_state_dict(b.state_dict())
    c = unetx.UNet(1, 2, base_channels=4, depth=3)
    with pytest.raises(ValueError, match=r"different configuration|does not fit this model"):
        a.load_state_dict(c.state_dict())
    sd = a.state_dict()
    sd.pop("head.bias")
    with pytest.raises(ValueError, match=r"missing \['head.bias'\]"):
        a.load_state_dict(sd)
