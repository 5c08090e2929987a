"""The build's configuration step (CMakeLists.txt), run for real with the torch of this environment: every GPU
architecture list a user may have reaches the build intact, and a bad one is refused with a message naming it.

Configure only (no compile): `pip install .` of the whole extension is what CI's README lines and
scripts/install-matrix do. Needs cmake >= 3.26 and pybind11 (tests/requirements.txt); the CUDA cases need nvcc
and a CUDA build of torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pybind11 = pytest.importorskip("pybind11")


def _cmake() -> str:
    try:  # the cmake that pip installs (tests/requirements.txt), wherever its venv's bin/ is
        import cmake

        exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        exe = shutil.which("cmake")
    if exe is None:
        pytest.skip("cmake not installed")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    major, minor = map(int, re.search(r"(\d+)\.(\d+)", version).groups())
    if (major, minor) < (3, 26):
        pytest.skip(f"cmake {major}.{minor} < 3.26")
    return exe


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    """One build folder for the module: reconfiguring it reuses CMake's CUDA compiler checks (~15 s each)."""
    return tmp_path_factory.mktemp("configure")


def configure(tmp_path: Path, arch_list: str | None, cuda: str = "AUTO") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_CUDA_ARCH_LIST", "UNETX_"))}
    if arch_list is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    cmd = [
        _cmake(),
        "-S",
        str(ROOT),
        "-B",
        str(tmp_path / "build"),
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DUNETX_CUDA={cuda}",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def generated(tmp_path: Path) -> dict[str, str]:
    text = (tmp_path / "build" / "generated" / "build_info.h").read_text()
    return dict(re.findall(r'^#define (UNETX_\w+) "(.*)"$', text, re.M))


def cuda_architectures(r: subprocess.CompletedProcess) -> str:
    """CMAKE_CUDA_ARCHITECTURES as the configure step reports it (what nvcc is asked to build)."""
    return re.search(r"unetx: CUDA kernels ON \(nvcc [^,]*, archs (\S+) from", r.stdout).group(1)


needs_nvcc = pytest.mark.skipif(
    torch.version.cuda is None or (shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc")),
    reason="needs a CUDA build of torch and nvcc",
)


@needs_nvcc
@pytest.mark.parametrize(
    "arch_list,archs,cmake_archs",
    [
        ("9.0", "9.0", "90-real"),
        ("8.0;8.6;9.0+PTX", "8.0;8.6;9.0+PTX", "80-real;86-real;90"),
        ("8.0 8.6 9.0", "8.0;8.6;9.0", "80-real;86-real;90-real"),
        ("9.0a", "9.0a", "90a-real"),
    ],
    ids=["one", "semicolons-ptx", "spaces", "arch-specific"],
)
def test_arch_list_reaches_the_build_intact(build_dir, arch_list, archs, cmake_archs):
    r = configure(build_dir, arch_list)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = generated(build_dir)
    assert info["UNETX_CUDA_ARCHS"] == archs
    assert info["UNETX_CUDA_NOTE"] == ""
    assert cuda_architectures(r) == cmake_archs
    # the compiler string (parentheses, '+', spaces) arrives whole too
    assert info["UNETX_CXX_COMPILER"] and "\n" not in info["UNETX_CXX_COMPILER"]
    assert info["UNETX_TORCH_VERSION"] == torch.__version__


@needs_nvcc
def test_default_arch_list_without_a_gpu(build_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the default is its architecture")
    r = configure(build_dir, None)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert generated(build_dir)["UNETX_CUDA_ARCHS"] == "8.0;9.0+PTX"
    assert cuda_architectures(r) == "80-real;90"
    assert "from the default (no GPU visible)" in r.stdout


@needs_nvcc
@pytest.mark.parametrize("arch_list", ["sm_90", "9.0+ptx", "Hopper;9.0"])
def test_bad_arch_list_is_refused_with_its_entry_named(build_dir, arch_list):
    r = configure(build_dir, arch_list)
    assert r.returncode != 0
    bad = arch_list.split(";")[0]
    assert f"TORCH_CUDA_ARCH_LIST entry '{bad}'" in r.stderr, r.stderr[-2000:]


def test_cuda_off_says_why(tmp_path):
    r = configure(tmp_path, None, cuda="OFF")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = generated(tmp_path)
    assert info["UNETX_CUDA_ARCHS"] == "" and info["UNETX_CUDA_NOTE"] == "UNETX_CUDA=OFF at build time"
