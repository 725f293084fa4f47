"""Pure-Python unit tests of model selection (``selection.py``) and worker planning
(``scaling.py``): no database, no training."""

from __future__ import annotations

import math
import os

import pytest

from dbdl_magic.errors import InputError
from dbdl_magic.options import TrainOptions
from dbdl_magic.training import scaling, selection
from dbdl_magic.training.scaling import (
    MAX_AUTO_WORKERS,
    MIN_PARALLEL_SECONDS,
    REQUIRED_GAIN,
    SEGMENT_STARTUP_SECONDS,
    cpu_count,
    plan_workers,
    threads_per_worker,
)
from dbdl_magic.training.selection import (
    halving_rungs,
    label,
    maximize,
    rank,
    trial_options,
    trials,
)


def opts(**kwargs) -> TrainOptions:
    """Options as ``dl.train`` builds them (validated), target ``y``."""
    return TrainOptions.from_kwargs(target="y", **kwargs)


# -- selection.trials: grid -------------------------------------------------------------------
def test_no_grid_is_not_a_search():
    assert trials(opts()) == []


def test_grid_is_the_product_in_order():
    grid = {"lr": [1e-3, 1e-2], "batch_size": [32, 64, 128]}
    got = trials(opts(grid=grid))
    assert len(got) == 6
    assert got == [
        {"lr": 1e-3, "batch_size": 32},
        {"lr": 1e-3, "batch_size": 64},
        {"lr": 1e-3, "batch_size": 128},
        {"lr": 1e-2, "batch_size": 32},
        {"lr": 1e-2, "batch_size": 64},
        {"lr": 1e-2, "batch_size": 128},
    ]
    # keys in the grid's order, so labels read the way the user wrote the grid
    assert all(list(t) == ["lr", "batch_size"] for t in got)
    assert trials(opts(grid=grid, search="grid")) == got


def test_grid_over_architectures_and_optimizers():
    got = trials(opts(grid={"model": ["linear", "mlp:32"], "optimizer": ["sgd", "adam"]}))
    assert got == [
        {"model": "linear", "optimizer": "sgd"},
        {"model": "linear", "optimizer": "adam"},
        {"model": "mlp:32", "optimizer": "sgd"},
        {"model": "mlp:32", "optimizer": "adam"},
    ]


def test_grid_trials_samples_reproducibly_by_seed():
    grid = {"lr": [1e-4, 1e-3, 1e-2], "batch_size": [16, 32, 64, 128]}
    full = trials(opts(grid=grid))
    assert len(full) == 12
    first = trials(opts(grid=grid, trials=5, seed=3))
    assert len(first) == 5
    assert all(t in full for t in first)
    assert len({tuple(sorted(t.items())) for t in first}) == 5  # without replacement
    assert trials(opts(grid=grid, trials=5, seed=3)) == first
    others = [trials(opts(grid=grid, trials=5, seed=s)) for s in range(4, 12)]
    assert any(o != first for o in others)  # the seed matters
    # more trials than configurations: the whole grid (in some order), never duplicates
    everything = trials(opts(grid=grid, trials=50, seed=0))
    assert sorted(map(str, everything)) == sorted(map(str, full))


# -- selection.trials: random search ------------------------------------------------------------
def test_random_search_draws_within_bounds_log_uniformly():
    grid = {"lr": (1e-4, 1e-1), "batch_size": [32, 64], "optimizer": ["sgd", "adam"]}
    got = trials(opts(grid=grid, search="random", trials=64, seed=11))
    assert len(got) == 64
    lrs = [t["lr"] for t in got]
    assert all(1e-4 <= lr <= 1e-1 for lr in lrs)
    assert {t["batch_size"] for t in got} == {32, 64}  # lists are choices (64 draws see both)
    assert {t["optimizer"] for t in got} == {"sgd", "adam"}
    # log-uniform: P(lr < 1e-2) = 2/3 (uniform would give 0.1); the decades are all visited
    below = sum(lr < 1e-2 for lr in lrs) / len(lrs)
    assert 0.45 < below < 0.85, below
    decades = {math.floor(math.log10(lr)) for lr in lrs}
    assert decades == {-4, -3, -2}
    # reproducible by seed, and the seed matters
    assert trials(opts(grid=grid, search="random", trials=64, seed=11)) == got
    assert trials(opts(grid=grid, search="random", trials=64, seed=12)) != got


def test_random_search_integer_and_linear_ranges():
    grid = {"batch_size": (16, 128), "momentum": (0.0, 0.9), "weight_decay": (1e-6, 1e-2)}
    got = trials(opts(grid=grid, search="random", trials=40, seed=0, optimizer="sgd"))
    assert all(isinstance(t["batch_size"], int) and 16 <= t["batch_size"] <= 128 for t in got)
    assert all(0.0 <= t["momentum"] <= 0.9 for t in got)
    assert all(1e-6 <= t["weight_decay"] <= 1e-2 for t in got)
    # momentum is linear: about half the draws above the midpoint
    assert 0.2 < sum(t["momentum"] > 0.45 for t in got) / 40 < 0.8
    # weight_decay is log-scale: most draws far below the arithmetic midpoint
    assert sum(t["weight_decay"] < 5e-3 for t in got) / 40 > 0.8


# -- selection.trials: errors -----------------------------------------------------------------
def _error(**kwargs) -> str:
    with pytest.raises(InputError) as info:
        trials(opts(**kwargs))
    return str(info.value)


def test_unknown_grid_key_is_named():
    message = _error(grid={"lr": [1e-3], "epochs": [1, 2]})
    assert "grid" in message and "'epochs'" in message
    assert "lr" in message and "batch_size" in message  # lists what can be searched


@pytest.mark.parametrize("values", [[], (), 0.01, "adam"])
def test_grid_values_must_be_a_non_empty_list(values):
    message = _error(grid={"lr": values} if values != "adam" else {"optimizer": values})
    assert "grid[" in message and "non-empty list" in message


def test_random_without_trials():
    message = _error(grid={"lr": (1e-4, 1e-2)}, search="random")
    assert "search='random'" in message and "trials" in message


def test_search_or_trials_without_grid():
    assert "grid" in _error(search="random", trials=3)
    assert "grid" in _error(trials=3)


def test_unknown_search_is_named():
    # the options refuse it first (dl.train path) ...
    with pytest.raises(InputError, match="search"):
        opts(grid={"lr": [1e-3]}, search="bayes")
    # ... and the selection itself refuses it when handed unvalidated options
    raw = TrainOptions(target="y", grid={"lr": [1e-3]}, search="bayes")
    with pytest.raises(InputError, match="search='bayes'"):
        trials(raw)


def test_too_many_configurations():
    grid = {"lr": [1e-4 * (i + 1) for i in range(9)], "batch_size": [8 * (i + 1) for i in range(8)]}
    message = _error(grid=grid)
    assert "72" in message and str(selection.MAX_TRIALS) in message and "trials" in message
    # sampling brings it under the limit
    assert len(trials(opts(grid=grid, trials=selection.MAX_TRIALS))) == selection.MAX_TRIALS
    assert "65" in _error(grid={"lr": (1e-4, 1e-2)}, search="random", trials=65)


def test_bad_value_inside_the_grid_names_configuration_and_option():
    message = _error(grid={"lr": [1e-3, -1], "batch_size": [32]})
    assert "grid configuration lr=-1 batch_size=32" in message
    assert "option lr=-1" in message
    message = _error(grid={"batch_size": [32, 0]})
    assert "batch_size=0" in message and "grid configuration" in message
    message = _error(grid={"optimizer": ["adam", "lbfgs"]})
    assert "optimizer" in message and "lbfgs" in message


def test_trial_options_replace_and_leave_the_run_options_alone():
    base = opts(lr=1e-3, batch_size=64)
    changed = trial_options(base, {"lr": 0.01, "batch_size": 32, "model": "linear"})
    assert (changed.lr, changed.batch_size, changed.model) == (0.01, 32, "linear")
    assert (base.lr, base.batch_size, base.model) == (1e-3, 64, "mlp:64,32")


# -- halving, ranking, labels ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("epochs", "k", "rungs"),
    [
        (4, 4, [1, 2]),
        (8, 8, [1, 2, 4]),
        (3, 1, []),
        (10, 3, [2, 5]),
        (10, 2, [5]),
        (4, 2, [2]),
        (1, 4, []),
        (2, 4, [1]),
        (16, 5, [2, 4, 8]),
        (100, 64, [1, 3, 6, 12, 25, 50]),
    ],
)
def test_halving_rungs(epochs, k, rungs):
    assert halving_rungs(epochs, k) == rungs


def test_halving_leaves_one_trial_when_epochs_allow():
    """With epochs ≥ 2**ceil(log2 K), halving at the rungs leaves exactly one trial, each
    rung inside the run, strictly increasing."""
    for k in range(1, 65):
        rounds = math.ceil(math.log2(k)) if k > 1 else 0
        for epochs in range(max(1, 2**rounds), 2**rounds + 4):
            rungs = halving_rungs(epochs, k)
            assert rungs == sorted(set(rungs)) and all(0 < r < epochs for r in rungs)
            alive = k
            for _ in rungs:
                alive = max(1, math.ceil(alive / 2))
            assert alive == 1, (epochs, k, rungs)


def test_maximize():
    for metric in ("val_loss", "train_loss", "val_mae", "val_mse"):
        assert not maximize(metric), metric
    for metric in ("val_accuracy", "val_f1", "val_r2", "train_accuracy"):
        assert maximize(metric), metric


def test_rank_min_and_max_metrics_with_missing_values():
    rows = {
        0: {"val_loss": 0.5, "val_accuracy": 0.80},
        1: {"val_loss": 0.2, "val_accuracy": 0.95},
        2: {"val_loss": None, "val_accuracy": float("nan")},
        3: {"val_loss": 0.9, "val_accuracy": 0.70},
        4: {},
        5: {"val_loss": 0.2, "val_accuracy": 0.95},  # tie with 1: the lower member id first
    }
    assert rank(rows, "val_loss") == [1, 5, 0, 3, 2, 4]
    assert rank(rows, "val_accuracy") == [1, 5, 0, 3, 2, 4]
    assert rank({3: {"val_loss": float("nan")}, 1: {}}, "val_loss") == [1, 3]
    assert rank({}, "val_loss") == []


def test_label_formatting():
    assert label({"lr": 0.001, "batch_size": 64}) == "lr=0.001 batch_size=64"
    assert label({"lr": 0.00012345}) == "lr=0.000123"
    assert label({"lr": 0.003, "model": "mlp:32,16"}) == "lr=0.003 model=mlp:32,16"
    assert label({"weight_decay": 1e-5, "optimizer": "adam"}) == "weight_decay=1e-05 optimizer=adam"
    assert label({}) == ""


# -- scaling: threads and estimates -------------------------------------------------------------
def test_threads_per_worker_fits_the_cores():
    for cpus in range(1, 17):
        for workers in range(1, cpus + 1):
            t = threads_per_worker(cpus, workers)
            assert t >= 1 and workers * t <= cpus, (cpus, workers, t)
            assert workers * (t + 1) > cpus  # and uses them
    assert threads_per_worker(2, 4) == 1  # more workers than cores: still one thread each
    assert threads_per_worker(8, 2, forced=3) == 3
    assert threads_per_worker(8, 0) == 8
    assert threads_per_worker(8, 2, parameters=5_000) == 1  # small models: one thread
    assert threads_per_worker(8, 2, parameters=2_000_000) == 4
    assert threads_per_worker(8, 2, forced=3, parameters=5_000) == 3


def test_cpu_count_prefers_the_server():
    assert cpu_count({"cpus": 6}) == 6
    local = os.cpu_count() or 1
    assert cpu_count(None) == local
    assert cpu_count({"cpus": 0}) == local
    assert cpu_count({"cpus": "4"}) == local


# -- scaling.plan_workers -----------------------------------------------------------------------
def plan(parallel="auto", *, unavailable=None, cpus=4, serial=None, startup=None, remaining=10,
         measured=None):
    return plan_workers(parallel, unavailable=unavailable, cpus=cpus, serial_seconds=serial,
                        remaining=remaining, startup_seconds=startup, measured=measured)


def test_forced_segment_count():
    p = plan(3, serial=0.01, startup=100.0)
    assert p.workers == 3 and p.note == "3 segments, forced"
    assert plan(1).workers == 1 and plan(1).note == "1 process, forced"


def test_a_database_without_segments_uses_one_process():
    for parallel in ("auto", 4):
        p = plan(parallel, unavailable="citus: its shards train", cpus=16, serial=100.0)
        assert p.workers == 1 and p.note == "1 process (citus: its shards train)"


def test_auto_before_measuring():
    p = plan(serial=None, startup=0.0, cpus=16)
    assert p.workers == 1 and "measuring" in p.note


def test_auto_short_iteration_stays_in_one_process():
    p = plan(serial=MIN_PARALLEL_SECONDS * 0.9, startup=0.0, cpus=16)
    assert p.workers == 1 and "too short" in p.note


def test_auto_one_core_stays_in_one_process():
    assert plan(serial=100.0, cpus=1).workers == 1


def test_auto_long_iteration_spreads_capped_by_cores():
    p = plan(serial=20.0, startup=0.5, cpus=4)
    assert p.workers == 4 and "4 cores" in p.note and "5.00" in p.note and "20.00" in p.note
    assert plan(serial=20.0, startup=0.5, cpus=2).workers == 2
    assert plan(serial=1000.0, startup=0.1, cpus=64).workers == MAX_AUTO_WORKERS


def test_auto_weighs_the_start_up_against_the_remaining_iterations():
    # 2 s per iteration on 2 cores saves 1 s per iteration: worth a 3 s start-up over 4
    # iterations, not over 2; once the segments are open (start-up 0) even 1 iteration pays
    assert plan(serial=2.0, cpus=2, remaining=4).workers == 2
    p = plan(serial=2.0, cpus=2, remaining=2)
    assert p.workers == 1 and "less than their start-up" in p.note
    assert plan_startup_default() == SEGMENT_STARTUP_SECONDS
    assert plan(serial=2.0, cpus=2, remaining=1, startup=0.0).workers == 2


def plan_startup_default() -> float:
    """The start-up the planner assumes before measuring (read back from a note)."""
    note = plan(serial=2.0, cpus=2, remaining=2).note
    return float(note.rsplit("start-up ", 1)[1].rstrip(" s)"))


def test_auto_keeps_segments_only_while_measured_faster():
    fast = plan(serial=10.0, cpus=2, measured={2: 6.0})
    assert fast.workers == 2 and "measured 6.00" in fast.note
    slow = plan(serial=10.0, cpus=2, measured={2: REQUIRED_GAIN * 10.0 + 0.5})
    assert slow.workers == 1 and "2 segments measured" in slow.note


def test_scaling_exports():
    assert set(scaling.__all__) >= {"plan_workers", "threads_per_worker", "cpu_count"}
    assert set(selection.__all__) >= {"trials", "halving_rungs", "rank", "label"}


# -- planning.IterationPlanner: auto opens, keeps or drops segments -----------------------------
class _Segments:
    def __init__(self, size: int) -> None:
        self.size, self.closed = size, False

    def close(self) -> None:
        self.closed = True


class _Backend:
    """A database that can run segments (what the planner asks of a backend)."""

    def __init__(self) -> None:
        self.opened: list[_Segments] = []

    def segments_unavailable(self, parallel):
        return None

    def distribution(self, packed):
        return None

    def open_segments(self, size, token):
        self.opened.append(_Segments(size))
        return self.opened[-1]


def _planner(epochs=10):
    from types import SimpleNamespace

    from dbdl_magic.training.planning import IterationPlanner

    backend = _Backend()
    planner = IterationPlanner(backend, opts(epochs=epochs), cpus=2, token="t")
    return planner, backend, SimpleNamespace(table="p", n_parameters=1000, n_buffers=16)


def test_auto_opens_segments_once_measured_and_keeps_its_choice():
    planner, backend, data = _planner()
    first = planner.plan(data, 0)
    planner.measured_iteration(first, 9.0, first=True)  # pays imports: not measured
    second = planner.plan(data, 1)
    assert first.workers == second.workers == 1 and backend.opened == []
    planner.measured_iteration(second, 4.0, first=False)
    third = planner.plan(data, 2)  # 4 s on 1 process: 2 segments save 2 s × 8 iterations
    assert third.workers == 2 and third.segments is backend.opened[0]
    planner.measured_iteration(third, 3.9, first=False)  # no faster: drop them, for good
    fourth = planner.plan(data, 3)
    assert fourth.workers == 1 and backend.opened[0].closed
    planner.measured_iteration(fourth, 9.0, first=False)  # a slow, noisy iteration later on
    assert planner.plan(data, 4).workers == 1 and len(backend.opened) == 1
    planner.close()


def test_auto_keeps_segments_that_pay():
    planner, backend, data = _planner()
    for epoch, seconds in enumerate([9.0, 4.0, 2.1, 2.0, 2.2]):
        plan = planner.plan(data, epoch)
        planner.measured_iteration(plan, seconds, first=epoch == 0)
    assert [p.size for p in backend.opened] == [2] and not backend.opened[0].closed
    assert planner.plan(data, 5).workers == 2
    planner.close()
    assert backend.opened[0].closed
