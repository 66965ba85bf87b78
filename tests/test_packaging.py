"""The package as users install it: every subpackage listed, the shipped tables inside the wheel."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from evict.paths import PACKAGE_DIR, TESTBED_COST_TABLE, shipped_config

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed_and_configs_ship_as_evict_configs():
    tool = PYPROJECT["tool"]["setuptools"]
    # evict/testing/cuda_shim is a PYTHONPATH root (its sgl_kernel stand-in is a top-level package
    # there), shipped as package data, not a subpackage of evict
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "evict").rglob("__init__.py")
        if "cuda_shim" not in p.parts
    }
    assert set(tool["packages"]) == found | {"evict.configs"}
    assert tool["package-dir"] == {"evict.configs": "configs"}
    assert "*.json" in tool["package-data"]["evict.configs"]


def test_the_checkout_finds_its_shipped_table():
    path = shipped_config()
    assert path is not None and path.name == TESTBED_COST_TABLE and path.is_file()
    assert shipped_config("no_such_table.json") is None


@pytest.mark.skipif(
    importlib.util.find_spec("wheel") is None or importlib.util.find_spec("setuptools") is None,
    reason="building the wheel without isolation needs setuptools and wheel (the dev extra has them)",
)
def test_the_wheel_carries_the_tables_and_the_testbed(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            ROOT,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("evict-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    shipped = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").glob("*.json")}
    assert {f"evict/configs/{n}" for n in shipped} <= names
    for folder in ("testbed", "testbed_moe128"):  # both shipped pairs
        testbed = PACKAGE_DIR / folder
        want = {"evict/" + p.relative_to(PACKAGE_DIR).as_posix() for p in testbed.rglob("*") if p.is_file()}
        assert want <= names and any(n.endswith(".safetensors") for n in want), folder
    # installed as a wheel, the shipped table resolves to the package's own copy
    probe = "from evict.paths import shipped_config; print(shipped_config())"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""},
    ).stdout.strip()
    assert Path(out) == tmp_path / "site" / "evict" / "configs" / TESTBED_COST_TABLE


@pytest.mark.parametrize(
    "modules",
    [
        ("evict.truncation", "evict.profiler.auto", "evict.profiler.cli", "evict.kernels"),
        pytest.param(("evict.plugin.worker",), marks=pytest.mark.sglang),
    ],
    ids=["rule-and-profiler", "plugin"],
)
def test_the_rule_profiler_and_plugin_never_import_the_reference_engine(modules):
    """Issue 20 item 5: tree helpers live with the rule, step pricing takes samples; the engine is
    the bench's and the CLI's, never the server's."""
    if "evict.plugin.worker" in modules:
        pytest.importorskip("sglang")
    code = (
        "import importlib, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('evict.engine'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1:] in ([], [""]), out.stdout
