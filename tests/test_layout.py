"""The package layout's rules: `import unetx` loads torch and numpy only (the application and its dependencies load
on first use), the layers import downward only (ops <- nn <- app), and the public names keep working."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import unetx

PACKAGE = Path(unetx.__file__).parent
APP_DEPENDENCIES = ("scipy", "PIL", "matplotlib", "tifffile")


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_import_unetx_loads_no_application_dependency():
    code = (
        "import sys, unetx, torch; m = unetx.UNet(1, 2, 4, 2); m(torch.randn(1, 1, 8, 8)); "
        f"print(sorted(n for n in sys.modules if n.split('.')[0] in {APP_DEPENDENCIES!r} "
        "or n.startswith('unetx.app')))"
    )
    assert _run(code) == "[]"


def test_application_loads_on_first_use():
    code = "import sys, unetx; unetx.checkpoint.load_model; print('unetx.app.checkpoint' in sys.modules)"
    assert _run(code) == "True"


def _imports(path: Path) -> set[str]:
    """The unetx modules a file imports, resolved to absolute names."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out |= {name} | {f"{name}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {n for n in out if n.startswith("unetx")}


def test_layers_import_downward_only():
    forbidden = {
        "ops": ("unetx.nn", "unetx.app", "unetx.reference", "unetx.bench"),
        "nn": ("unetx.app", "unetx.reference", "unetx.bench", "unetx.ops.reference"),
    }
    bad = []
    for layer, names in forbidden.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for name in _imports(path):
                if name.startswith(names):
                    bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    # production code never imports the references (the plain-PyTorch twin is what nn.unet exports *to*)
    for path in sorted((PACKAGE / "app").rglob("*.py")):
        bad += [
            f"{path.relative_to(PACKAGE)} imports {n}"
            for n in _imports(path)
            if n.startswith(("unetx.reference", "unetx.ops.reference"))
        ]
    assert not bad, bad
    # the extension loader imports nothing of unetx's own but the compiled module (no ops <-> loader cycle)
    assert _imports(PACKAGE / "ops" / "_extension.py") <= {"unetx", "unetx._C"}


def test_public_names():
    assert unetx.UNet is unetx.nn.UNet
    assert unetx.reference.UNet is unetx.nn.reference.UNet
    assert callable(unetx.convert) and callable(unetx.predict_tiled) and callable(unetx.evaluate)
    assert callable(unetx.checkpoint.load_model)
    assert _run(
        "import runpy, sys; sys.argv = ['unetx', '--version']\n"
        "try:\n    runpy.run_module('unetx', run_name='__main__')\nexcept SystemExit:\n    pass"
    ).startswith("unetx ")


def test_old_application_module_paths_import():
    # `from unetx.checkpoint import load_model` and friends, written before the application was a package
    out = _run(
        "import sys\n"
        "from unetx.checkpoint import load_model\n"
        "import unetx.data, unetx.predict, unetx.metrics\n"
        "import unetx\n"
        "assert sys.modules['unetx.checkpoint'] is unetx.app.checkpoint is unetx.checkpoint\n"
        "assert unetx.data is unetx.app.data and unetx.predict.predict_tiled is unetx.predict_tiled\n"
        "try:\n    import unetx.no_such_module\nexcept ModuleNotFoundError:\n    print('refused')\n"
    )
    assert out.strip() == "refused"
