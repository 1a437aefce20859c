"""Execute every notebook in notebooks/ with small settings (JAXCOMPRESS_NOTEBOOK_QUICK=1)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Notebooks listed here run with `-m slow` (the default suite must stay well under 15 minutes on
# 2 cores). Notebook 06, rebuilt on `jc.structure` (#23), takes about 35 s of CPU in quick mode.
_SLOW_NOTEBOOKS: set[str] = set()
NOTEBOOKS = [
    pytest.param(p, marks=pytest.mark.slow) if p.name in _SLOW_NOTEBOOKS else p
    for p in sorted((_ROOT / "notebooks").glob("*.ipynb"))
]
TIMEOUT_S = 600
PATH_VARIABLES = ("JAXCOMPRESS_DATA_DIR", "JAXCOMPRESS_CACHE_DIR")


@pytest.mark.parametrize("name", PATH_VARIABLES)
def test_path_variables_are_absolute(name):
    """conftest made relative data/cache paths absolute: notebook kernels (in notebooks/) agree."""
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set")
    assert os.path.isabs(value), f"{name}={value!r} reached the tests relative"
    if name == "JAXCOMPRESS_DATA_DIR":
        assert os.path.isdir(value), f"{name}={value!r} is not a directory"


def test_relative_path_variables_resolve_against_the_start_directory(tmp_path):
    """The README's relative JAXCOMPRESS_DATA_DIR, given from another directory, still works."""
    data = os.environ.get("JAXCOMPRESS_DATA_DIR")
    if not data or not os.path.isdir(data):
        pytest.skip("JAXCOMPRESS_DATA_DIR not available")
    start = _ROOT / "tests"
    env = dict(
        os.environ,
        JAXCOMPRESS_DATA_DIR=os.path.relpath(data, start),
        JAXCOMPRESS_CACHE_DIR=os.path.relpath(tmp_path / "cache", start),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "test_notebooks.py::test_path_variables_are_absolute",
        ],
        cwd=start,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout, proc.stdout[-3000:]


def test_notebooks_exist():
    assert NOTEBOOKS, "notebooks/ has no .ipynb file"


@pytest.mark.parametrize(
    "path", NOTEBOOKS, ids=[(p.values[0] if hasattr(p, "values") else p).name for p in NOTEBOOKS]
)
def test_notebook_executes(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    # Committed notebooks carry no outputs.
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name}: commit notebooks with outputs cleared"
    # The kernel inherits this environment. jupyter_client starts the "python3" kernelspec with
    # sys.executable, i.e. this venv's interpreter; the repository root goes on PYTHONPATH.
    monkeypatch.setenv("JAXCOMPRESS_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")
    )
    # One device in the kernel: drop the 8 emulated devices the test process uses.
    flags = os.environ.get("XLA_FLAGS", "").split()
    monkeypatch.setenv(
        "XLA_FLAGS", " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
    )
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
