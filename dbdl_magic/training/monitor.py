"""The hook that forwards a run to the monitors' :class:`~dbdl_magic.events.Callbacks`: the
run's facts at the start, each iteration's history row, in-iteration progress."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbdl_magic.display import selection_mode
from dbdl_magic.events import Callbacks
from dbdl_magic.training.hooks import Hook, Iteration

if TYPE_CHECKING:
    from dbdl_magic.training.run import TrainingRun


class MonitorHook(Hook):
    """Forwards to ``callbacks``: ``on_start`` (:func:`start_info`), ``on_iteration`` with
    the run's new history row (not for iterations a resume replays), ``on_progress``."""

    def __init__(self, callbacks: Callbacks) -> None:
        self.callbacks = callbacks

    @property
    def listens_to_progress(self) -> bool:  # type: ignore[override]
        """Whether the monitor shows progress (asked before every iteration)."""
        return self.callbacks.on_progress is not None

    def on_run_start(self, run: TrainingRun, first_epoch: int) -> None:
        if self.callbacks.on_start is not None:
            self.callbacks.on_start(start_info(run, first_epoch))

    def on_progress(self, run: TrainingRun, done: int, total: int) -> None:
        if self.callbacks.on_progress is not None:
            self.callbacks.on_progress(done, total)

    def on_iteration_end(self, run: TrainingRun, it: Iteration) -> None:
        if not it.replayed and self.callbacks.on_iteration is not None:
            self.callbacks.on_iteration(run.history[-1])


def start_info(run: TrainingRun, first_epoch: int) -> dict[str, Any]:
    """The run's facts a monitor shows first: the model key, database, rows, buffers,
    parameters, workers, epochs, device; for a cohort its members and selection metric."""
    data, opts, first = run.packed, run.options, run.members[0]
    info: dict[str, Any] = {
        **first.key,
        "database": run.backend.describe(),
        "backend": run.backend.name,
        "rows": data.n_train,
        "validation_rows": data.n_val,
        "buffers": data.n_buffers,
        "parameters": data.n_parameters,
        "workers": opts.parallel if run.backend.supports_parallel else 1,
        "epochs": opts.epochs,
        "first_epoch": first_epoch,
        "device": "cuda" if opts.db_device != "cpu" and run.server.get("cuda") else "cpu",
        "cohort": run.cohort,
    }
    if run.cohort:
        info["members"] = [
            {"member": m.member, "label": m.label, "version": m.key["version"],
             "group": m.group, "trial": m.trial}
            for m in run.members
        ]
        info["selection_metric"] = run.selection_metric
        info["selection_mode"] = selection_mode(run.selection_metric)
        info["group_by"] = opts.group_by
    return info


__all__ = ["MonitorHook", "start_info"]
