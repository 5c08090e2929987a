"""unetx.allocator: the `unetx` commands keep freed activation-sized blocks in the heap (glibc), so a training step
does not fault in its activations' pages again every step; `import unetx` alone leaves the allocator alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# a training step's allocation pattern in miniature: activation-sized tensors (36-64 MiB) allocated, written and
# freed step after step; prints the page faults of the last two steps (after eight to settle: the heap reaches its
# steady layout within 2-4 steps in isolation, later now and then inside a test session) and what two steps of fresh
# pages would fault in
FAULTS = """
import resource, torch
{setup}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    ts = [torch.empty(n << 20).fill_(1.0) for n in (12, 9, 16, 9)]
    del ts
for _ in range(8):
    step()
before = faults()
for _ in range(2):
    step()
print(faults() - before, 2 * (12 + 9 + 16 + 9) * (4 << 20) // resource.getpagesize())
"""


def _faults(setup: str, **env) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS.format(setup=setup)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    faults, pages = out.stdout.strip().splitlines()[-1].split()
    return int(faults), int(pages)


def test_commands_keep_freed_blocks():
    faults, pages = _faults("import unetx.allocator as a; assert a.keep_freed_memory()")
    assert faults < pages // 10, (faults, pages)


def test_import_unetx_and_the_opt_out_leave_malloc_alone():
    faults, pages = _faults("import unetx")  # a library does not retune its host process
    assert faults > pages // 2, (faults, pages)
    faults, pages = _faults("import unetx.allocator as a; assert not a.keep_freed_memory()", UNETX_MALLOC="system")
    assert faults > pages // 2, (faults, pages)


def test_cli_applies_it_and_bench_reports_it():
    code = (
        "import unetx.allocator as a, unetx.app.cli as cli\n"
        "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
        "from unetx.bench.runner import machine_info\n"
        "print(a._applied, machine_info()['allocator'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1].startswith("True glibc malloc, freed blocks kept"), out


@pytest.mark.parametrize("command", [["train", "--help"], ["bench", "--rounds", "1"]])
def test_misspelt_setting_is_a_clear_error(command):
    """A value other than system/keep stops the command before it does anything: one line naming the value and the
    fix, exit 2, no traceback."""
    out = subprocess.run(
        [sys.executable, "-m", "unetx", *command],
        env={**os.environ, "UNETX_MALLOC": "sytem"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr and out.stdout == "", out
    (line,) = out.stderr.strip().splitlines()
    assert "UNETX_MALLOC='sytem'" in line and "UNETX_MALLOC=system" in line, line


def test_keep_is_the_default_by_name():
    faults, pages = _faults("import unetx.allocator as a; assert a.keep_freed_memory()", UNETX_MALLOC="keep")
    assert faults < pages // 10, (faults, pages)
