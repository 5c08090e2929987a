"""The end of every install-matrix case (scripts/install-matrix): import unetx, report how it was built, and run a
small UNet forward and backward on the CPU against its plain-PyTorch twin.

    python scripts/install_check.py --expect-cuda yes|no|any
"""

import argparse
import json

import torch
import unetx

parser = argparse.ArgumentParser()
parser.add_argument(
    "--expect-cuda",
    choices=["yes", "no", "any"],
    default="any",
    help="whether the CUDA kernels must (yes) or must not (no) have been compiled",
)
args = parser.parse_args()

info = unetx.build_info()
print("build_info:", json.dumps(info))
if args.expect_cuda == "yes":
    assert info["cuda"], f"the CUDA kernels were not compiled ({info['cuda_note']}), though nvcc is on this machine"
elif args.expect_cuda == "no":
    assert not info["cuda"], "CUDA kernels were compiled where none were expected"
    assert info["cuda_note"], "build_info() gives no reason for the missing CUDA kernels"

torch.manual_seed(0)
model = unetx.UNet(in_channels=1, out_channels=2, base_channels=8, depth=2)
twin = model.to_reference()
x = torch.randn(2, 1, 37, 42)
out, ref = model(x), twin(x)
out.square().mean().backward()
ref.square().mean().backward()
assert out.shape == (2, 2, 37, 42), out.shape
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
twin_params = dict(twin.named_parameters())  # the two share state_dict names
for name, p in model.named_parameters():
    torch.testing.assert_close(p.grad, twin_params[name].grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
print(f"forward+backward of a small UNet matches unetx.reference (torch {torch.__version__})")
