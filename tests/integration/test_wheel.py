"""dbdl_magic installed from its wheel, and what a database needs before it can train.

The wheel is built from a copy of the source tree (as ``pip wheel`` would from an sdist, with
no network: ``--no-build-isolation`` uses the venv's setuptools), installed into a scratch
folder, and used by a separate Python whose ``sys.path`` starts with that folder and holds no
checkout: it connects to a fresh PostgreSQL database without the kernels (warned, training
refused with the fix), installs them (the SQL script must come from the wheel), and trains on
SQLite and PostgreSQL. The PostgreSQL server still imports the kernels from its own
``PYTHONPATH`` (this checkout): what is tested is the client package.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import StaticPool

import dbdl_magic as dl
from dbdl_magic.kernel import plpython

REPO = Path(__file__).resolve().parents[2]
# what an sdist would not carry, or what other work in the checkout leaves behind
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".ruff_cache", "*.db", "*.db-*", "notebooks", "benchmarks", "tests", ".ci",
)


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a command; its output is in the assertion message when it fails."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, **kwargs)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this source tree, built offline from a clean copy."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--no-cache-dir", "-w", str(base / "dist"), str(source)], cwd=base)
    built = sorted((base / "dist").glob("dbdl_magic-*.whl"))
    assert len(built) == 1, built
    return built[0]


def test_wheel_carries_every_module_and_the_kernel_sql(wheel: Path) -> None:
    """Every module of the source tree, the install script (byte for byte), the entry point."""
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "dbdl_magic").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules - names == set(), "modules missing from the wheel (pyproject packages?)"
    assert "dbdl_magic/sql/postgres/install.sql" in names
    assert "dbdl_magic/sql/__init__.py" in names
    with zipfile.ZipFile(wheel) as archive:
        script = archive.read("dbdl_magic/sql/postgres/install.sql").decode("utf-8")
        entry = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    assert "CREATE OR REPLACE FUNCTION dbdl.kernel_info()" in script
    assert script.strip(), "empty install script"
    assert b"dbdl = dbdl_magic.cli:main" in entry


def test_this_checkout_reads_the_canonical_script() -> None:
    """The editable install (scripts/setup.sh) maps ``dbdl_magic.sql`` onto ``kernels/``: the
    script installed is the file in the tree, not a copy."""
    from dbdl_magic.backends.postgres import install_sql

    assert install_sql() == (REPO / "kernels" / "postgres" / "install.sql").read_text("utf-8")


# Runs in a Python whose sys.path is [the wheel's target folder, the venv's site-packages, the
# standard library]: no checkout, no .pth files (so no editable-install finder either).
CLIENT = r"""
import json, sys, warnings
target, sqlite_url, pg_url = sys.argv[1:4]
sys.path[:0] = [target, *json.loads(sys.argv[4])]

import dbdl_magic as dl
from dbdl_magic.backends.postgres import install_sql
from dbdl_magic.datasets import digits_frame, load_table

out = {"sys_path": sys.path, "install_sql": len(install_sql())}
frame = digits_frame()
for key, url in (("sqlite", sqlite_url), ("postgres", pg_url)):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        con = dl.connect(url)
    record = {
        "warnings": [str(w.message) for w in caught if w.category is dl.InstallWarning],
        "missing": con.missing,
    }
    load_table(con.engine, "digits", frame)
    record["refused"] = []
    for attempt in (
        lambda: dl.train(con, "SELECT * FROM digits", target="digit", epochs=1),
        lambda: dl.predict(con, "no_model_yet", "SELECT * FROM digits"),
    ):
        try:
            attempt()
        except dl.InstallError as exc:
            record["refused"].append(str(exc))
        except dl.InputError as exc:  # SQLite: the kernels are there, the model is not
            record["refused"].append(f"InputError: {exc}")
    dl.install(con)
    record["missing_after_install"] = con.missing
    model = dl.train(con, "SELECT * FROM digits", target="digit", model="mlp:32", epochs=3,
                     seed=0, device="cpu")
    record["val_accuracy"] = float(model.history["val_accuracy"].iloc[-1])
    record["accuracy"] = float((model.predict(frame) == frame["digit"].to_numpy()).mean())
    record["stored"] = model.name in set(dl.list_models(con)["name"])
    con.engine.dispose()
    out[key] = record
out["files"] = sorted(
    m.__file__ for name, m in sys.modules.items()
    if name.split(".")[0] == "dbdl_magic" and getattr(m, "__file__", None)
)
print(json.dumps(out))
"""


def test_installed_wheel_installs_the_kernels_and_trains(
    wheel: Path, pg_server, tmp_path: Path
) -> None:
    """From the wheel alone: connect (warned), install, train on SQLite and PostgreSQL."""
    target = tmp_path / "target"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir",
         "--target", str(target), str(wheel)])
    pg_url = pg_server.create_database(f"dbdl_wheel_{os.getpid()}_{uuid.uuid4().hex[:8]}")
    sqlite_url = f"sqlite:///{tmp_path / 'wheel.db'}"
    # -I: no PYTHONPATH, user site or current directory; -S: no site-packages, no .pth files
    done = run([sys.executable, "-I", "-S", "-c", CLIENT, str(target), sqlite_url, pg_url,
                json.dumps(site.getsitepackages())], cwd=tmp_path)
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert out["sys_path"][0] == str(target)
    assert not any(Path(p).resolve() == REPO for p in out["sys_path"] if p)
    assert out["files"] and all(Path(f).is_relative_to(target) for f in out["files"]), out["files"]
    assert str(target / "dbdl_magic" / "__init__.py") in out["files"]
    assert out["install_sql"] > 1000

    sqlite, postgres = out["sqlite"], out["postgres"]
    assert sqlite["warnings"] == [] and sqlite["missing"] is None
    assert len(sqlite["refused"]) == 1 and "no_model_yet" in sqlite["refused"][0]
    # a fresh PostgreSQL database: connect returns, warns once and says what to do
    assert len(postgres["warnings"]) == 1
    assert postgres["missing"] == postgres["warnings"][0]
    assert "not installed" in postgres["missing"] and "dbdl install" in postgres["missing"]
    assert postgres["refused"] == [postgres["missing"]] * 2  # training and predicting
    assert postgres["missing_after_install"] is None
    for record in (sqlite, postgres):
        assert record["stored"]
        assert record["val_accuracy"] > 0.5, record  # 10 classes: chance is 0.1
        assert record["accuracy"] > 0.5, record


# -- the server's python3 must import every module the kernels use -------------------------------
@pytest.mark.parametrize("module", ["zstandard", "dbdl_magic.kernel.rowpredict"])
def test_kernel_info_names_a_missing_module(module: str, monkeypatch) -> None:
    """In-process (as SQLite runs the kernels): an import that fails is named."""
    assert json.loads(plpython.kernel_info())["zstandard"]
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=f"cannot import: {module} "):
        plpython.kernel_info()


def test_server_without_zstandard(pg_db) -> None:
    """A server process that cannot import zstandard: connect warns naming it and the fix,
    training is refused with the same message; the other processes are unaffected."""
    one = create_engine(pg_db.engine.url, poolclass=StaticPool)  # one server process
    try:
        with one.begin() as conn:
            conn.exec_driver_sql(
                "DO $$ import sys; sys.modules['zstandard'] = None $$ LANGUAGE plpython3u"
            )
        with pytest.warns(dl.InstallWarning, match="cannot import zstandard") as caught:
            db = dl.connect(one)
        message = str(caught[0].message)
        assert db.missing == message and "PYTHONPATH" in message
        assert "torch, numpy, safetensors, zstandard and dbdl_magic" in message
        with pytest.raises(dl.InstallError, match="cannot import zstandard") as refused:
            dl.train(db, "SELECT 1.0 AS x, 1 AS y", target="y", epochs=1)
        assert "ModuleNotFoundError" in refused.value.detail
    finally:
        one.dispose()
    fresh = dl.connect(pg_db.engine.url.render_as_string(hide_password=False))
    try:
        assert fresh.missing is None and fresh.info["zstandard"]
    finally:
        fresh.engine.dispose()
