"""The magics through a real IPython InteractiveShell."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from sqlalchemy import create_engine, text

import dbdl_magic as dl
from dbdl_magic.datasets import digits_frame, load_table
from dbdl_magic.errors import InputError


@pytest.fixture
def shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "dbdl_magic")
    ip.run_line_magic("load_ext", "dbdl_magic")  # idempotent
    ip.run_line_magic("reload_ext", "dbdl_magic")  # fresh connection registry per test
    yield ip
    ip.user_ns.pop("digits_model", None)


def run(ip: InteractiveShell, cell: str):
    with capture_output() as captured:
        result = ip.run_cell(cell)
    return result, captured.stdout


def digits_db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    frame = digits_frame().head(600)
    frame.insert(0, "id", np.arange(len(frame)))
    load_table(create_engine(url), "digits", frame)
    return url


def test_dbtrain_binds_parameters_and_the_model(shell, tmp_path):
    url = digits_db(tmp_path)
    shell.run_line_magic("dbconnect", f"{url} --alias shop")
    shell.user_ns["max_id"] = 500
    result, out = run(shell, (
        "%%dbtrain digits_model --target digit --model mlp:32 --epochs 3 --seed 1 "
        "--batch-size 32\nSELECT * FROM digits WHERE id < :max_id"
    ))
    assert result.success, result.error_in_exec
    model = shell.user_ns["digits_model"]
    assert isinstance(model, torch.nn.Module) and model.name == "digits_model"
    assert len(model.history) == 3
    assert "dbdl: model digits_model v1 complete | 3 iteration(s)" in out
    assert sum(model.history["samples"].iloc[:1]) + round(500 * 0.2) == 500  # only id < 500
    models = shell.run_line_magic("dbmodels", "")
    assert list(models["name"]) == ["digits_model"]


def test_unknown_flags_and_missing_parameters_are_errors(shell, tmp_path):
    shell.run_line_magic("dbconnect", digits_db(tmp_path))
    with pytest.raises(UsageError):
        shell.run_cell_magic("dbtrain", "m --target digit --epochz 3", "SELECT * FROM digits")
    result, _ = run(shell, "%%dbtrain m --target digit\nSELECT * FROM digits WHERE id < :nope")
    assert isinstance(result.error_in_exec, InputError)
    assert ":nope" in str(result.error_in_exec)
    result, _ = run(shell, "%%dbtrain m --target label\nSELECT * FROM digits")
    assert not result.success and "label" in str(result.error_in_exec)
    assert "m" not in shell.user_ns


def test_hostile_parameter_values_are_bound_not_pasted(shell, tmp_path):
    shell.run_line_magic("dbconnect", digits_db(tmp_path))
    shell.user_ns["hostile"] = "0; DROP TABLE digits; --"
    result, _ = run(shell, "%%dbtrain m --target digit --epochs 1\n"
                           "SELECT * FROM digits WHERE CAST(id AS TEXT) <> :hostile")
    assert result.success, result.error_in_exec
    with create_engine(digits_db_url(tmp_path)).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM digits")).scalar_one() == 600


def digits_db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'shop.db'}"


def test_config_defaults_and_embedded_default(shell, tmp_path):
    shell.run_line_magic("config", "DbdlMagic.epochs = 2")
    frame = digits_frame().head(300)
    load_table(create_engine(f"sqlite:///{tmp_path / 'dbdl.db'}"), "digits", frame)
    result, out = run(shell, "%%dbtrain small --target digit --model linear\n"
                             "SELECT * FROM digits")
    assert result.success, result.error_in_exec
    assert "using the embedded database sqlite:///dbdl.db" in out
    assert len(shell.user_ns["small"].history) == 2
    shell.run_line_magic("config", "DbdlMagic.epochs = 10")


def test_dbconnect_engine_variable_aliases_list_and_close(shell, tmp_path):
    url = digits_db(tmp_path)
    shell.user_ns["engine"] = create_engine(url)
    _, out = run(shell, "%dbconnect engine --alias eng")
    assert "as 'eng'" in out
    shell.run_line_magic("dbconnect", f"sqlite:///{tmp_path / 'other.db'} --alias other")
    listing = shell.run_line_magic("dbconnect", "--list")
    assert list(listing["alias"]) == ["eng", "other"]
    assert list(listing["current"]) == [False, True]
    shell.run_line_magic("dbconnect", "eng")
    assert shell.run_line_magic("dbconnect", "--list")["current"].tolist() == [True, False]
    shell.run_line_magic("dbconnect", "--close other")
    assert list(shell.run_line_magic("dbconnect", "--list")["alias"]) == ["eng"]
    with pytest.raises(InputError, match="not_a_variable"):
        shell.run_line_magic("dbconnect", "not_a_variable")


def test_errors_are_real_exceptions_with_short_display(shell, tmp_path):
    shell.run_line_magic("dbconnect", digits_db(tmp_path))
    result, _ = run(shell, "%%dbtrain m --target digit --model resnet\nSELECT * FROM digits")
    assert isinstance(result.error_in_exec, dl.SpecError)
    assert result.success is False


def test_dbtrain_on_postgres_hides_the_password(shell, pg_db):
    load_table(pg_db.engine, "digits", digits_frame().head(400))
    url = pg_db.engine.url.set(password="s3cret").render_as_string(hide_password=False)
    _, out = run(shell, f"%dbconnect {url} --alias pg")
    assert "s3cret" not in out and "***" in out
    listing = shell.run_line_magic("dbconnect", "--list")
    assert "s3cret" not in listing.to_string()
    result, out = run(shell, "%%dbtrain pgm --target digit --model linear --epochs 2\n"
                             "SELECT * FROM digits")
    assert result.success, result.error_in_exec
    assert "s3cret" not in out
    assert len(shell.user_ns["pgm"].history) == 2


def test_install_magic_is_idempotent(shell, tmp_path):
    shell.run_line_magic("dbconnect", digits_db(tmp_path))
    _, out = run(shell, "%dbinstall")
    _, out2 = run(shell, "%dbinstall")
    assert "kernels installed" in out and "kernels installed" in out2



def test_dbtrain_grid_search_binds_the_best_model_and_prints_the_leaderboard(shell, tmp_path):
    url = digits_db(tmp_path)
    shell.run_line_magic("dbconnect", url)
    shell.user_ns["space"] = {"lr": [1e-3, 5e-3], "model": ["linear", "mlp:32"]}
    result, out = run(shell, (
        "%%dbtrain picked --target digit --grid space --epochs 4 --display text --seed 0\n"
        "SELECT * FROM digits"
    ))
    assert result.success, result.error_in_exec
    model = shell.user_ns["picked"]
    board = model.leaderboard
    assert len(board) == 4 and list(board["rank"]) == [1, 2, 3, 4]
    assert model.version == 5  # four trials, then the best stored as the newest version
    best = board.iloc[0]
    assert model.history["val_loss"].iloc[-1] == pytest.approx(best["val_loss"])
    assert f"best: {best['label']}" in out and "halved" in out  # leaderboard in the text monitor
    # a dict literal works too, and --no-halving trains every configuration to the end
    result, out = run(shell, (
        "%%dbtrain picked2 --target digit --grid \"{'lr': [1e-3, 5e-3]}\" --no-halving "
        "--epochs 2 --display none\nSELECT * FROM digits"
    ))
    assert result.success, result.error_in_exec
    assert list(shell.user_ns["picked2"].leaderboard["epochs"]) == [2, 2]


def test_dbtrain_scale_out_flags_reach_the_engine(shell, tmp_path):
    url = digits_db(tmp_path)
    shell.run_line_magic("dbconnect", url)
    result, _ = run(shell, (
        "%%dbtrain synced --target digit --model linear --epochs 2 --sync-every 0.5 "
        "--parallel auto --display none\nSELECT * FROM digits"
    ))
    assert result.success, result.error_in_exec
    history = shell.user_ns["synced"].history
    assert (history["samples"] == 480).all()  # 600 rows, 20 % held out: every row once
    assert history["parallel_note"].str.contains("measuring").all()
    result, _ = run(shell, (
        "%%dbtrain bad --target digit --grid not_a_dict_or_literal\nSELECT * FROM digits"
    ))
    assert isinstance(result.error_in_exec, InputError)
    assert "--grid" in str(result.error_in_exec)
