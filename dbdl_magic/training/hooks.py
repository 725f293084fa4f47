"""The hooks a training run calls at its turning points, and the ones every run has.

A hook implements any of :class:`Hook`'s methods. The run calls them in list order:

* ``on_run_start(run, first_epoch)`` once the members exist (created, or resumed);
* ``on_progress(run, done, total)`` while an iteration trains (only hooks that listen);
* ``on_iteration_end(run, it)`` after every committed iteration; a resumed run first replays
  its stored iterations through it (``it.replayed``, before ``on_run_start``);
* ``on_interrupt(run, exc)`` on Ctrl-C after the members were marked interrupted: the first
  hook returning a model key makes the run return that model instead of re-raising;
* ``on_run_end(run)`` when the run completes, after the members are marked complete and
  before the run's model is stored.

Order matters at the end of an iteration: the history row is recorded first, monitors see it
(:class:`~dbdl_magic.training.monitor.MonitorHook`), then early stopping and successive halving
decide, and the members' statuses after those decisions go into the row last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dbdl_magic.training import cohort
from dbdl_magic.training.history import note_statuses, run_row
from dbdl_magic.training.members import MemberRun, by_group
from dbdl_magic.training.policies import survivors

if TYPE_CHECKING:
    from dbdl_magic.training.run import TrainingRun


@dataclass
class Iteration:
    """A committed iteration: the members that trained in it and their history rows."""

    epoch: int  # iterations done (the rows' "epoch")
    members: list[MemberRun]
    rows: dict[int, dict[str, Any]]  # member → its row
    seconds: float  # the iteration's wall time, commit included
    train_seconds: float  # of which the aggregate query
    replayed: bool = False  # re-read from the store by a resume (monitors saw it already)


class Hook:
    """Something a run calls at its turning points; every method is optional (no-op)."""

    #: whether :meth:`on_progress` wants calls (reporting progress costs the kernels a little)
    listens_to_progress: bool = False

    def on_run_start(self, run: TrainingRun, first_epoch: int) -> None:
        """The run's members exist; training starts at ``first_epoch`` (> 0: resumed)."""

    def on_progress(self, run: TrainingRun, done: int, total: int) -> None:
        """Samples trained so far in the running iteration, of ``total``."""

    def on_iteration_end(self, run: TrainingRun, it: Iteration) -> None:
        """An iteration committed (or was replayed by a resume)."""

    def on_interrupt(self, run: TrainingRun, exc: KeyboardInterrupt) -> dict[str, Any] | None:
        """Ctrl-C: return the key of a model to return instead of re-raising, or None."""
        return None

    def on_run_end(self, run: TrainingRun) -> None:
        """The run completed: its members are marked complete, its model not yet stored."""


@dataclass
class HookList:
    """The run's hooks, called in order."""

    hooks: list[Hook] = field(default_factory=list)

    def on_run_start(self, run: TrainingRun, first_epoch: int) -> None:
        """Call every hook's ``on_run_start``."""
        for hook in self.hooks:
            hook.on_run_start(run, first_epoch)

    def progress(self, run: TrainingRun, total: int) -> Callable[[int], None] | None:
        """The sink for an iteration's progress (samples done of ``total``), or None when no
        hook listens (the kernels then report none)."""
        listening = [h for h in self.hooks if h.listens_to_progress]
        if not listening:
            return None

        def sink(done: int) -> None:
            for hook in listening:
                hook.on_progress(run, done, total)

        return sink

    def on_iteration_end(self, run: TrainingRun, it: Iteration) -> None:
        """Call every hook's ``on_iteration_end``."""
        for hook in self.hooks:
            hook.on_iteration_end(run, it)

    def on_interrupt(self, run: TrainingRun, exc: KeyboardInterrupt) -> dict[str, Any] | None:
        """The model key the first hook returns for an interrupted run (None: re-raise)."""
        for hook in self.hooks:
            key = hook.on_interrupt(run, exc)
            if key is not None:
                return key
        return None

    def on_run_end(self, run: TrainingRun) -> None:
        """Call every hook's ``on_run_end``."""
        for hook in self.hooks:
            hook.on_run_end(run)


class RecordHistory(Hook):
    """Appends each iteration's run row (:func:`~dbdl_magic.training.history.run_row`)."""

    def on_iteration_end(self, run: TrainingRun, it: Iteration) -> None:
        run.history.append(run_row(run, it.rows, it.seconds, it.train_seconds))


class RecordStatuses(Hook):
    """Puts the members' statuses after an iteration's decisions (and at the end of the run)
    into the run's last row; goes after the deciding hooks."""

    def on_iteration_end(self, run: TrainingRun, it: Iteration) -> None:
        note_statuses(run)

    def on_run_end(self, run: TrainingRun) -> None:
        note_statuses(run)


class EarlyStop(Hook):
    """Early stopping per member (``patience``): a member whose monitored metric stopped
    improving is ``early-stopped``. In a cohort a member without that metric is not watched."""

    def on_iteration_end(self, run: TrainingRun, it: Iteration) -> None:
        for m in it.members:
            row = m.history[-1]
            watched = m.stopper is not None and (m.stopper.monitor in row or not run.cohort)
            if watched and m.stopper.update(row):
                m.status = "early-stopped"


class Halving(Hook):
    """Successive halving of a search: at each rung (epochs done) the worse half of the live
    trials is ``halved``, within each group when every group runs its own search."""

    def __init__(self, rungs: list[int]) -> None:
        self.rungs = rungs

    def on_iteration_end(self, run: TrainingRun, it: Iteration) -> None:
        if it.epoch not in self.rungs:
            return
        for live in by_group([m for m in it.members if m.status == "training"]).values():
            keep = survivors({m.member: m.history[-1] for m in live}, run.selection_metric)
            for m in live:
                if m.member not in keep:
                    m.status = "halved"


class ReturnOnInterrupt(Hook):
    """``on_interrupt="return"``: Ctrl-C returns the model so far
    (:func:`~dbdl_magic.training.cohort.model_so_far`) instead of raising."""

    def on_interrupt(self, run: TrainingRun, exc: KeyboardInterrupt) -> dict[str, Any] | None:
        return cohort.model_so_far(run)


__all__ = [
    "EarlyStop",
    "Halving",
    "Hook",
    "HookList",
    "Iteration",
    "RecordHistory",
    "RecordStatuses",
    "ReturnOnInterrupt",
]
