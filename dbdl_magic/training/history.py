"""The run's history rows: one per iteration, what a monitor shows and the store keeps.

A one-model run's row is its member's row; a cohort's row summarises its members (the best
trial's metrics for a search, row-weighted means for groups) and lists every member's line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbdl_magic.display import metrics_of
from dbdl_magic.training.members import MemberRun, by_group
from dbdl_magic.training.selection import rank

if TYPE_CHECKING:
    from dbdl_magic.training.run import TrainingRun


def member_row(
    epoch: int, info: dict[str, Any], metrics: dict[str, Any], prefix: str,
    **timings: Any,
) -> dict[str, Any]:
    """One member's history row after ``epoch`` iterations: its training loss (``info``, the
    kernels' state header), its evaluation ``metrics`` named ``prefix`` + metric, then the
    iteration's ``timings`` and facts."""
    row: dict[str, Any] = {"epoch": epoch, "train_loss": info.get("loss")}
    for name, value in metrics.items():
        if name != "n":
            row[f"{prefix}{name}"] = value
    row.update(timings)
    return row


def run_row(
    run: TrainingRun, rows: dict[int, dict[str, Any]], seconds: float, trained: float
) -> dict[str, Any]:
    """The row a monitor shows for an iteration whose member ``rows`` are given: the member's
    own, or a summary plus every member's line."""
    if not run.cohort:
        return dict(next(iter(rows.values())))
    first = next(iter(rows.values()))
    out: dict[str, Any] = {"epoch": first["epoch"]}
    metric_names = list(metrics_of(first))
    if run.cohort == "selection":
        best = rank(rows, run.selection_metric)[0]
        out.update({k: rows[best].get(k) for k in metric_names})
    else:  # groups: means weighted by each group's rows (a searching group: its best)
        by_member = {m.member: m for m in run.members}
        if run.options.grid:
            best_rows = [rank({m.member: rows[m.member] for m in ms}, run.selection_metric)[0]
                         for ms in by_group([by_member[i] for i in rows]).values()]
            rows = {i: rows[i] for i in best_rows}
        out.update(_weighted_means(rows, by_member, metric_names))
    out.update(
        seconds=seconds,
        train_seconds=trained,
        samples=sum(r["samples"] for r in rows.values()),
        workers=max(r["workers"] for r in rows.values()),
        combines=sum(r["combines"] for r in rows.values()),
        db_device=first["db_device"],
        stored_bytes=sum(r["stored_bytes"] for r in rows.values()),
        parallel_note=first["parallel_note"],
        members=[m.summary() for m in run.members],
    )
    return out


def _weighted_means(
    rows: dict[int, dict[str, Any]], by_member: dict[int, MemberRun], names: list[str]
) -> dict[str, float | None]:
    """Each metric's mean over ``rows``, weighted by the member's validation rows (``val_*``)
    or training rows (the rest)."""
    out: dict[str, float | None] = {}
    for name in names:
        pairs = [
            (r[name], by_member[i].validation_rows if name.startswith("val_")
             else by_member[i].train_rows)
            for i, r in rows.items() if r.get(name) is not None
        ]
        weight = sum(w for _, w in pairs)
        out[name] = sum(v * w for v, w in pairs) / weight if weight else None
    return out


def catch_up(run: TrainingRun) -> None:
    """Add the run rows of iterations the members' histories hold but the run's history does
    not (committed, then interrupted before they were recorded)."""
    committed = max((len(m.history) for m in run.members), default=0)
    while len(run.history) < committed:
        epoch = len(run.history)
        rows = {m.member: m.history[epoch] for m in run.members if len(m.history) > epoch}
        first = next(iter(rows.values()))
        run.history.append(run_row(run, rows, first["seconds"], first["train_seconds"]))


def note_statuses(run: TrainingRun) -> None:
    """Put the members' current statuses in the run's last row (cohorts only)."""
    if run.cohort and run.history:
        run.history[-1]["members"] = [m.summary() for m in run.members]


__all__ = ["catch_up", "member_row", "note_statuses", "run_row"]
