"""The example notebooks run clean under nbval, and failing cells fail nbval and ``dbdl report``.

Each notebook runs in a temporary copy of ``notebooks/`` (its embedded ``dbdl.db`` lands there),
in a fresh kernel of this Python (``--nbval-current-env``). Cells marked ``# NBVAL_CHECK_OUTPUT``
must reproduce their stored output: the deterministic summary line on SQLite, only the
structure (status, workers) of the parallel PostgreSQL run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
SQLITE_NOTEBOOKS = ["quickstart", "dataframe_accessor", "cnn_digits", "scale_out"]
ALL_NOTEBOOKS = [*SQLITE_NOTEBOOKS, "postgres"]
CHECK = "# NBVAL_CHECK_OUTPUT"


def notebook_env(**extra: str) -> dict[str, str]:
    """The test process's environment without a ``DBDL_DATABASE`` override, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "DBDL_DATABASE"}
    env.update(extra)
    return env


def run_nbval(notebook: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``pytest --nbval-lax`` on ``notebook`` in its own directory (no repo config, no cache)."""
    return subprocess.run(
        [
            sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env",
            "--nbval-cell-timeout", "300", "-p", "no:cacheprovider", "-q", notebook.name,
        ],
        cwd=notebook.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def copy_notebook(name: str, tmp_path: Path) -> Path:
    work = tmp_path / "notebooks"
    work.mkdir()
    return Path(shutil.copy(NOTEBOOKS / f"{name}.ipynb", work))


def assert_passed(result: subprocess.CompletedProcess[str]) -> None:
    report = f"nbval failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebook_is_commit_ready(name: str) -> None:
    """Outputs are stored only where nbval checks them, and nothing is bulky."""
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert path.stat().st_size < 20_000
    assert "widgets" not in nb.metadata
    code = [c for c in nb.cells if c.cell_type == "code"]
    checked = [c for c in code if c.source.startswith(CHECK)]
    assert checked, f"{name} has no {CHECK} cell"
    for cell in code:
        if cell in checked:
            assert cell.execution_count is not None and cell.outputs, cell.source
            assert all(o.output_type == "stream" for o in cell.outputs), cell.source
        else:
            assert cell.outputs == [] and cell.execution_count is None, cell.source
    assert "base64" not in json.dumps(nb)


@pytest.mark.parametrize("name", SQLITE_NOTEBOOKS)
def test_sqlite_notebook_runs_under_nbval(name: str, tmp_path: Path) -> None:
    result = run_nbval(copy_notebook(name, tmp_path), notebook_env())
    assert_passed(result)
    assert (tmp_path / "notebooks" / "dbdl.db").exists() or name == "dataframe_accessor"


@pytest.mark.postgres
def test_postgres_notebook_runs_under_nbval(pg_server, tmp_path: Path) -> None:
    url = pg_server.create_database(f"dbdl_notebook_{os.getpid()}")
    result = run_nbval(copy_notebook("postgres", tmp_path), notebook_env(DBDL_PG_URL=url))
    assert_passed(result)


def failing_notebook(path: Path) -> Path:
    """A small notebook whose ``%%dbtrain`` cell names a target column that does not exist."""
    nb = new_notebook(
        cells=[
            new_code_cell(
                "import pandas as pd\n"
                "from dbdl_magic.datasets import load_table\n"
                "import dbdl_magic\n"
                "frame = pd.DataFrame({'x': [float(i) for i in range(40)], 'y': [i % 2 for i in "
                "range(40)]})\n"
                "load_table(dbdl_magic.connect().engine, 'points', frame)"
            ),
            new_code_cell("%load_ext dbdl_magic"),
            new_code_cell("%%dbtrain m --target no_such_label --epochs 1\nSELECT * FROM points"),
            new_code_cell("print('never reached')"),
        ]
    )
    nb.metadata["kernelspec"] = {
        "name": "python3", "display_name": "Python 3", "language": "python"
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_failing_dbtrain_cell_fails_nbval(tmp_path: Path) -> None:
    result = run_nbval(failing_notebook(tmp_path / "nb" / "bad.ipynb"), notebook_env())
    assert result.returncode != 0, result.stdout
    assert "1 failed" in result.stdout, result.stdout
    assert "no_such_label" in result.stdout, result.stdout


def test_failing_cell_fails_dbdl_report_with_the_error(tmp_path: Path) -> None:
    notebook = failing_notebook(tmp_path / "nb" / "bad.ipynb")
    out = tmp_path / "out" / "bad.html"
    result = subprocess.run(
        [sys.executable, "-m", "dbdl_magic.cli", "report", str(notebook), "-o", str(out)],
        env=notebook_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0, result.stdout
    assert "cell 2 failed" in result.stderr and "no_such_label" in result.stderr, result.stderr
    assert "InputError" in result.stderr, result.stderr
    # Both files are written, and they show the error too.
    assert "no_such_label" in out.read_text()
    executed = nbformat.read(out.with_suffix(".ipynb"), as_version=4)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert [e.ename for e in errors] == ["InputError"]
    assert (tmp_path / "nb" / "dbdl.db").exists()  # the cells ran in the notebook's directory
