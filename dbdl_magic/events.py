"""What a training run tells the people watching it: the hooks a monitor implements and the
typed records a monitor reads.

The run calls ``on_start`` once with the run's facts (members, rows, workers, device),
``on_iteration`` after every committed iteration with its history row, and ``on_progress``
while an iteration runs (samples done in the epoch so far, samples per epoch). The run sends
plain dicts; :meth:`RunStarted.from_info` and :meth:`IterationFinished.from_row` turn them into
records (``to_info`` / ``to_row`` give the dicts back), and :class:`RunFinished` is how a run
ended: the model it returned (:meth:`RunFinished.from_model`) or the error that stopped it
(:meth:`RunFinished.from_error`). Keys a record does not know are kept in its ``extra``.

This module depends on :mod:`dbdl_magic.display` (the metric vocabulary) only: monitors in the
notebook front and the training loop both import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from dbdl_magic.display import (
    best_text,
    groups_text,
    is_missing,
    metrics_of,
    ranking_metric,
    short_error,
    summary_line,
)


@dataclass
class Callbacks:
    """Hooks for monitors: run start facts, each iteration's row, in-iteration progress."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_iteration: Callable[[dict[str, Any]], None] | None = None
    on_progress: Callable[[int, int], None] | None = None  # (samples done, samples per epoch)


def _require(row: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(
            f"{what}: missing {', '.join(map(repr, missing))} (given: {', '.join(map(str, row))})"
        )


# -- on_start ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CohortMember:
    """One model of a cohort run (groups, selection) as ``on_start`` announces it."""

    member: int
    label: str
    version: int | None = None
    group: str | None = None
    trial: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, facts: Mapping[str, Any]) -> CohortMember:
        """From an entry of the ``members`` list of the ``on_start`` facts."""
        _require(facts, ("member",), "a cohort member")
        return cls(
            member=int(facts["member"]),
            label=str(facts.get("label") or ""),
            version=facts.get("version"),
            group=facts.get("group"),
            trial=facts.get("trial"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The entry as the run sends it."""
        return {"member": self.member, "label": self.label, "version": self.version,
                "group": self.group, "trial": self.trial}


_START_REQUIRED = ("name", "version", "database", "backend", "rows", "validation_rows",
                   "buffers", "parameters", "workers", "epochs", "device")
_COHORT_KEYS = ("members", "selection_metric", "selection_mode", "group_by")


@dataclass(frozen=True)
class RunStarted:
    """The facts of a run, sent once before its first iteration (``on_start``).

    ``workers`` is a count or ``"auto"``; ``first_epoch`` is where a resumed run starts. Cohort
    runs (``cohort`` ``"groups"`` or ``"selection"``) list their ``members`` and the metric
    the trials are ranked by (``selection_mode`` ``"min"`` or ``"max"``).
    """

    name: str
    version: int
    database: str
    backend: str
    rows: int
    validation_rows: int
    buffers: int
    parameters: int
    workers: int | str
    epochs: int
    device: str
    first_epoch: int = 0
    cohort: str | None = None
    members: tuple[CohortMember, ...] = ()
    selection_metric: str | None = None
    selection_mode: str | None = None
    group_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> RunStarted:
        """From the dict the run passes to ``on_start`` (a ValueError names missing facts)."""
        _require(info, _START_REQUIRED, "the on_start facts")
        known = {f.name for f in fields(cls)} - {"members", "extra"}
        return cls(
            **{k: v for k, v in info.items() if k in known},
            members=tuple(CohortMember.from_dict(m) for m in info.get("members") or ()),
            extra={k: v for k, v in info.items() if k not in known and k != "members"},
        )

    @classmethod
    def of(cls, event: RunStarted | Mapping[str, Any]) -> RunStarted:
        """``event`` itself, or the record of an ``on_start`` dict."""
        return event if isinstance(event, RunStarted) else cls.from_info(event)

    def to_info(self) -> dict[str, Any]:
        """The dict the run sends (cohort keys only for a cohort run)."""
        out = {k: getattr(self, k) for k in (*_START_REQUIRED, "first_epoch", "cohort")}
        if self.cohort:
            out.update(
                members=[m.to_dict() for m in self.members],
                selection_metric=self.selection_metric,
                selection_mode=self.selection_mode,
                group_by=self.group_by,
            )
        return {**out, **self.extra}

    @property
    def ranks_members(self) -> bool:
        """True for a selection run: its members are a leaderboard, best first."""
        return self.cohort == "selection"


# -- on_iteration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemberProgress:
    """One model's line in a cohort iteration: status, last epoch, metrics."""

    member: int
    label: str
    status: str
    epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)
    version: int | None = None
    samples: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> MemberProgress:
        """From an entry of an iteration row's ``members`` list."""
        _require(row, ("member", "status", "epoch"), "a member line")
        metrics = metrics_of(row)
        known = {"member", "label", "status", "epoch", "version", "samples"}
        return cls(
            member=int(row["member"]),
            label=str(row.get("label") or ""),
            status=str(row["status"]),
            epoch=int(row["epoch"]),
            metrics=metrics,
            version=row.get("version"),
            samples=row.get("samples"),
            extra={k: v for k, v in row.items() if k not in known and k not in metrics},
        )

    def to_row(self) -> dict[str, Any]:
        """The line as the run sends it: member, label, status, version, epoch, metrics,
        samples (version and samples when known)."""
        out: dict[str, Any] = {"member": self.member, "label": self.label, "status": self.status}
        if self.version is not None:
            out["version"] = self.version
        out["epoch"] = self.epoch
        out.update(self.metrics)
        if self.samples is not None:
            out["samples"] = self.samples
        return {**out, **self.extra}


#: facts of an iteration row besides its epoch, metrics and members, in the run's order
ITERATION_FACTS = ("seconds", "train_seconds", "samples", "workers", "combines", "db_device",
                   "stored_bytes", "parallel_note")


@dataclass(frozen=True)
class IterationFinished:
    """An iteration committed (``on_iteration``): its epoch, metrics and facts.

    ``metrics`` are the ``train_*``/``val_*`` entries in the row's order (None when the split
    had no rows). A cohort run's row summarizes its models (the best trial of a selection, the
    row-weighted mean of groups) and lists every model's line in ``members``.
    """

    epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    train_seconds: float | None = None
    samples: int | None = None
    workers: int | None = None
    combines: int | None = None
    db_device: str | None = None
    stored_bytes: int | None = None
    parallel_note: str | None = None
    members: tuple[MemberProgress, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> IterationFinished:
        """From the dict the run passes to ``on_iteration`` (or a row of a model's history)."""
        _require(row, ("epoch",), "an iteration row")
        metrics = metrics_of(row)
        members = row.get("members")
        if is_missing(members):
            members = ()
        elif not isinstance(members, (list, tuple)):
            raise ValueError(f"an iteration row's members must be a list, not {members!r}")
        skip = {"epoch", "members", *ITERATION_FACTS, *metrics}
        return cls(
            epoch=int(row["epoch"]),
            metrics=metrics,
            **{k: row[k] for k in ITERATION_FACTS if k in row},
            members=tuple(MemberProgress.from_row(m) for m in members),
            extra={k: v for k, v in row.items() if k not in skip},
        )

    @classmethod
    def of(cls, event: IterationFinished | Mapping[str, Any]) -> IterationFinished:
        """``event`` itself, or the record of an ``on_iteration`` dict."""
        return event if isinstance(event, IterationFinished) else cls.from_row(event)

    def to_row(self) -> dict[str, Any]:
        """The row as the run sends it: epoch, metrics, the known facts (missing ones left
        out), members (cohort runs), then any other keys."""
        out: dict[str, Any] = {"epoch": self.epoch, **self.metrics}
        for name in ITERATION_FACTS:
            value = getattr(self, name)
            if not is_missing(value):
                out[name] = value
        if self.members:
            out["members"] = [m.to_row() for m in self.members]
        return {**out, **self.extra}

    def member_rows(self) -> list[dict[str, Any]]:
        """The members' lines as dicts (empty for a run of one model)."""
        return [m.to_row() for m in self.members]


# -- the end -------------------------------------------------------------------------------------
def _rows(value: Any, what: str) -> tuple[dict[str, Any], ...]:
    """Records of a table: a pandas DataFrame (by duck typing: this module imports no pandas)
    or a sequence of mappings; None is no table."""
    if value is None:
        return ()
    if hasattr(value, "columns") and callable(getattr(value, "to_dict", None)):
        return tuple(value.to_dict("records"))
    if isinstance(value, (list, tuple)) and all(isinstance(r, Mapping) for r in value):
        return tuple(dict(r) for r in value)
    raise TypeError(f"{what} must be a DataFrame or a list of dicts, not {type(value).__name__}")


def ended_status(error: BaseException) -> str:
    """How a run stopped by ``error`` ended: ``"interrupted"`` (Ctrl-C) or ``"failed"``."""
    return "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"


@dataclass(frozen=True)
class RunFinished:
    """How a run ended: status, every iteration, and for cohort runs the ``leaderboard`` of a
    selection (best first) or the ``group_table`` of a per-group model.

    ``status`` is ``"complete"``, ``"interrupted"`` or ``"failed"``; ``error`` is one line
    (:func:`~dbdl_magic.display.short_error`).
    """

    name: str
    version: int | None = None
    status: str = "complete"
    history: tuple[IterationFinished, ...] = ()
    leaderboard: tuple[dict[str, Any], ...] = ()
    group_table: tuple[dict[str, Any], ...] = ()
    selection_metric: str | None = None
    error: str | None = None

    @classmethod
    def from_model(
        cls,
        model: Any = None,
        *,
        history: Any = None,
        name: str | None = None,
        version: int | None = None,
        status: str | None = None,
        error: BaseException | str | None = None,
        leaderboard: Any = None,
        group_table: Any = None,
        selection_metric: str | None = None,
    ) -> RunFinished:
        """From the model a run returned (``name``, ``version``, ``status``, ``history``,
        ``info``; ``leaderboard`` / ``group_table`` when it has them), each overridden by the
        argument of the same name when given. A failed model's ``info["error"]`` is its
        error."""
        def given(value: Any, attribute: str) -> Any:
            return value if value is not None else getattr(model, attribute, None)

        info = getattr(model, "info", None)
        info = info if isinstance(info, Mapping) else {}
        status = status or getattr(model, "status", None) or "complete"
        if error is None and status == "failed":
            error = info.get("error")
        rows = _rows(given(history, "history"), "history")
        return cls(
            name=name if name is not None else str(getattr(model, "name", "model")),
            version=given(version, "version"),
            status=status,
            history=tuple(IterationFinished.from_row(r) for r in rows),
            leaderboard=_rows(given(leaderboard, "leaderboard"), "leaderboard"),
            group_table=_rows(given(group_table, "group_table"), "group_table"),
            selection_metric=given(selection_metric, "selection_metric")
            or info.get("selection_metric"),
            error=short_error(error) if error is not None else None,
        )

    @classmethod
    def from_error(
        cls,
        error: BaseException,
        started: RunStarted | None,
        history: Sequence[IterationFinished],
        members: Sequence[Mapping[str, Any]] = (),
        name: str = "model",
    ) -> RunFinished:
        """A run stopped by ``error`` after the iterations in ``history``: its last
        ``members`` lines become the leaderboard of a selection or the groups' table."""
        selection = started is not None and started.ranks_members
        return cls(
            name=started.name if started is not None else name,
            version=started.version if started is not None else None,
            status=ended_status(error),
            history=tuple(history),
            leaderboard=tuple(dict(m) for m in members) if selection else (),
            group_table=() if selection else tuple(dict(m) for m in members),
            selection_metric=started.selection_metric if started is not None else None,
            error=short_error(error),
        )

    @property
    def alert(self) -> bool:
        """True when the run did not complete (interrupted or failed)."""
        return self.status != "complete"

    @property
    def ranked_by(self) -> str | None:
        """The metric the leaderboard is ranked by (None without a leaderboard)."""
        if not self.leaderboard:
            return None
        columns = dict.fromkeys(k for row in self.leaderboard for k in row)
        return ranking_metric(self.selection_metric, columns)

    def history_rows(self) -> list[dict[str, Any]]:
        """The iterations as the rows of a model's history."""
        return [i.to_row() for i in self.history]

    def summary_line(self) -> str:
        """:func:`~dbdl_magic.display.summary_line` of this run: final metrics, then the best
        trial of a selection or the number of groups, then the error."""
        cohort = None
        if self.leaderboard:
            cohort = best_text(self.leaderboard[0], self.ranked_by)
        elif self.group_table:
            cohort = groups_text(len(self.group_table))
        last = self.history[-1].metrics if self.history else None
        return summary_line(self.name, self.version, self.status, len(self.history), last,
                            cohort=cohort, error=self.error)


__all__ = [
    "ITERATION_FACTS",
    "Callbacks",
    "CohortMember",
    "IterationFinished",
    "MemberProgress",
    "RunFinished",
    "RunStarted",
    "ended_status",
]
