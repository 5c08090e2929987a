"""unetx.convert on U-Nets written elsewhere: same state_dict, same outputs/gradients/running stats, fused ops
inside."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import unetx
from conftest import randomise_batchnorm
from torch import nn
from unetx import reference as ref


# An independently written U-Net in the style of the popular PyTorch repositories (milesial/Pytorch-UNet):
# double-conv blocks in nn.Sequential, max-pool, ConvTranspose2d, F.pad for odd sizes, torch.cat.
class DoubleConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        dy, dx = x2.size()[2] - x1.size()[2], x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class PopularUNet(nn.Module):
    def __init__(self, n_channels=1, n_classes=2):
        super().__init__()
        self.inc = DoubleConv(n_channels, 8)
        self.down1, self.down2 = Down(8, 16), Down(16, 32)
        self.up1, self.up2 = Up(32, 16), Up(16, 8)
        self.outc = nn.Conv2d(8, n_classes, kernel_size=1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        return self.outc(self.up2(self.up1(x3, x2), x1))


class AvgPoolNet(nn.Module):
    """Conv-BN-ReLU chains with functional ReLU and average pooling, and a strided conv convert must leave alone."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.c2, self.b2 = nn.Conv2d(5, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7)
        self.c3 = nn.Conv2d(7, 4, 3, stride=2, padding=1)  # not a 'same' conv: not fused

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.avg_pool2d(x, 2)
        x = torch.relu(self.b2(self.c2(x)))
        return self.c3(x)


def _uses_fused_ops(m: nn.Module) -> bool:
    code = "".join(sub.code for sub in m.modules() if isinstance(sub, torch.fx.GraphModule))
    return "conv_bn_relu_pending" in code


@pytest.mark.parametrize(
    "make, in_ch, size",
    [
        (PopularUNet, 1, (2, 30, 34)),
        (lambda: ref.UNet(1, 2, base_channels=6, depth=3), 1, (2, 29, 40)),
        (AvgPoolNet, 3, (2, 16, 20)),
    ],
)
def test_convert_matches_original(make, in_ch, size):
    torch.manual_seed(0)
    m = make()
    randomise_batchnorm(m, running_stats=False)
    original = copy.deepcopy(m.state_dict())
    c = unetx.convert(m)
    assert list(c.state_dict().keys()) == list(m.state_dict().keys())
    for k, v in m.state_dict().items():
        assert torch.equal(c.state_dict()[k], v), k
    assert isinstance(c, unetx.UNet) or _uses_fused_ops(c)
    x = torch.randn(size[0], in_ch, *size[1:])
    for _ in range(2):
        for train in (True, False):
            m.train(train)
            c.train(train)
            a, b = m(x), c(x)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
            g = torch.randn_like(a)
            a.backward(g)
            b.backward(g)
            for (name, p1), p2 in zip(m.named_parameters(), c.parameters()):
                torch.testing.assert_close(p2.grad, p1.grad, rtol=2e-3, atol=2e-4, msg=name)
            m.zero_grad()
            c.zero_grad()
    for k, v in m.state_dict().items():  # running statistics evolved identically
        torch.testing.assert_close(c.state_dict()[k].float(), v.float(), rtol=1e-5, atol=1e-6, msg=k)
    assert not all(torch.equal(original[k], v) for k, v in m.state_dict().items())  # they did evolve


def test_convert_leaves_unrecognised_models_alone_and_does_not_modify_input():
    m = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2))
    assert unetx.convert(m) is not m  # a copy (inplace=False) ...
    assert type(unetx.convert(m)) is nn.Sequential  # ... of the same, untouched structure
    p = PopularUNet()
    before = {k: v.clone() for k, v in p.state_dict().items()}
    unetx.convert(p)
    assert type(p.inc.double_conv) is nn.Sequential
    assert all(torch.equal(before[k], v) for k, v in p.state_dict().items())


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got dict"):
        unetx.convert({})
