"""The metric vocabulary and number formats (dbdl_magic.display), used by every layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dbdl_magic.display import (
    format_cell,
    is_metric,
    lower_is_better,
    metrics_of,
    ranking_metric,
    selection_mode,
    summary_line,
)
from dbdl_magic.errors import InputError
from dbdl_magic.options import TrainOptions
from dbdl_magic.training.policies import EarlyStopping
from dbdl_magic.training.selection import maximize, rank

ROOT = Path(__file__).resolve().parents[2]

LOWER = ["train_loss", "val_loss", "val_mse", "val_mae", "val_rmse", "train_rmse", "val_mape",
         "val_huber_loss", "loss", "rmse"]
HIGHER = ["val_accuracy", "train_accuracy", "val_f1", "val_r2", "accuracy"]


@pytest.mark.parametrize("name", LOWER)
def test_losses_and_errors_are_lower_is_better(name: str) -> None:
    assert lower_is_better(name) and selection_mode(name) == "min" and not maximize(name)


@pytest.mark.parametrize("name", HIGHER)
def test_scores_are_higher_is_better(name: str) -> None:
    assert not lower_is_better(name) and selection_mode(name) == "max" and maximize(name)


def test_which_columns_are_metrics() -> None:
    row = {"epoch": 3, "train_loss": 0.5, "seconds": 1.0, "train_seconds": 0.8,
           "val_rmse": 0.2, "samples": 10, "val_r2": None, "members": []}
    assert [k for k in row if is_metric(k)] == ["train_loss", "val_rmse", "val_r2"]
    assert metrics_of(row) == {"train_loss": 0.5, "val_rmse": 0.2, "val_r2": None}
    assert list(metrics_of(row)) == ["train_loss", "val_rmse", "val_r2"]  # the row's order


def test_cells_and_missing_values() -> None:
    assert format_cell(0.123456) == "0.1235" and format_cell(3) == "3" and format_cell("a") == "a"
    for missing in (None, float("nan"), pd.NA, pd.NaT):
        assert format_cell(missing) == "" and format_cell(missing, "-") == "-"
    assert format_cell([1, 2]) == "[1, 2]"


def test_summary_line() -> None:
    last = {"epoch": 2, "train_loss": 0.12345, "val_accuracy": 0.9, "val_f1": None,
            "seconds": 9.9, "train_seconds": 9.0}
    assert summary_line("m", 3, "complete", 2, last) == (
        "dbdl: model m v3 complete | 2 iteration(s) | train_loss 0.123 | val_accuracy 0.900"
    )
    assert summary_line("m", 3, "failed", 0, None, cohort="2 groups", error="E: x") == (
        "dbdl: model m v3 failed | 0 iteration(s) | 2 groups | E: x"
    )


def test_ranking_metric() -> None:
    columns = ["rank", "label", "train_loss", "val_loss", "val_accuracy"]
    assert ranking_metric("val_accuracy", columns) == "val_accuracy"
    assert ranking_metric("val_rmse", columns) == "val_loss"  # not a column: first val_ metric
    assert ranking_metric(None, ["label", "train_loss"]) == "train_loss"
    assert ranking_metric(None, ["label"]) is None


def test_training_policies_use_the_same_vocabulary() -> None:
    """Early stopping and trial ranking treat ``val_rmse`` as an error (smaller is better)."""
    stopper = EarlyStopping(TrainOptions(target="y", monitor="val_rmse", patience=1))
    assert not stopper.maximize
    assert not stopper.update({"epoch": 1, "val_rmse": 0.5})
    assert not stopper.update({"epoch": 2, "val_rmse": 0.4})  # better: smaller
    assert stopper.update({"epoch": 3, "val_rmse": 0.45})  # worse: patience 1 is used up
    assert stopper.best_iteration == 2
    rows = {0: {"val_rmse": 0.3}, 1: {"val_rmse": 0.1}, 2: {"val_rmse": None}}
    assert rank(rows, "val_rmse") == [1, 0, 2]
    assert rank({0: {"val_r2": 0.3}, 1: {"val_r2": 0.8}}, "val_r2") == [1, 0]
    with pytest.raises(InputError, match=r"use one of train_loss, val_rmse$"):
        EarlyStopping(TrainOptions(target="y", monitor="val_f1")).update(
            {"epoch": 1, "train_loss": 1.0, "train_seconds": 0.1, "val_rmse": 0.2}
        )


def test_display_and_events_import_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules);"
        "import dbdl_magic.display, dbdl_magic.events;"
        "new = sorted(set(sys.modules) - before);"
        "ours = ('dbdl_magic', 'dbdl_magic.display', 'dbdl_magic.events');"
        "bad = [m for m in new if m not in ours"
        " and m.split('.')[0] not in sys.stdlib_module_names];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
