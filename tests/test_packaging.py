"""What an install puts on a user's import path: ``fxtile`` and nothing generic beside it.

The graph package is the repository's top-level ``passes/`` folder, installed as ``fxtile.passes``: a user
whose project has its own ``passes.py`` or ``passes/`` package (common in compiler and torch.fx code) must
still be able to import and use fxtile, and fxtile must not shadow theirs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USE = textwrap.dedent("""
    import importlib.util, json, torch, fxtile
    import passes  # the user's own module, first on the path
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    fxtile.transform(mlp, shards=2)
    print(json.dumps({"users_passes": passes.MINE, "tiled": [m.tiled for m in fxtile.find(mlp)],
                      "graph_package": importlib.util.find_spec("fxtile.passes").origin}))
""")


def _run_in(folder, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the install and the user's folder
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_fxtile_runs_from_a_folder_holding_a_users_passes_module(tmp_path):
    (tmp_path / "passes.py").write_text("MINE = 'yes'\n")
    proc = _run_in(tmp_path, USE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert out["users_passes"] == "yes" and out["tiled"] == [True]
    assert os.path.basename(os.path.dirname(out["graph_package"])) == "passes"  # fxtile's own, as fxtile.passes


def test_fxtile_runs_beside_a_users_passes_package(tmp_path):
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "__init__.py").write_text("MINE = 'package'\n")
    proc = _run_in(tmp_path, USE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"users_passes": "package"' in proc.stdout


def test_no_top_level_passes_is_installed(tmp_path):
    proc = _run_in(tmp_path, "import importlib.util; print(importlib.util.find_spec('passes'))")
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stdout + proc.stderr


def test_the_graph_package_imports_nothing_of_the_runtime():
    """Dependencies point one way: the runtime (fxtile/) uses the graph package (passes/, installed as
    fxtile.passes), which imports only torch, networkx, the standard library, itself and (optionally)
    transformers."""
    import ast
    import pathlib

    allowed = {"torch", "networkx", "__future__", "transformers"}  # transformers: optional (its Conv1D is a linear layer)
    for path in sorted(pathlib.Path(ROOT, "passes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
                assert node.level <= 1, f"{path.name} imports from outside the graph package (level {node.level})"
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, f"{path.name} imports {name}"
