"""How a run ends in the store: members marked complete, then the model the run returns: the
only member, the best trial copied as the newest version (a search), or a router version that
sends each group to its own model (``group_by``, with a leaderboard per group that searched).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection

from dbdl_magic.display import metrics_of
from dbdl_magic.store import registry
from dbdl_magic.training.members import MemberRun, by_group
from dbdl_magic.training.prepare import spec_of
from dbdl_magic.training.selection import rank

if TYPE_CHECKING:
    from dbdl_magic.training.run import TrainingRun


def complete_members(run: TrainingRun, conn: Connection) -> None:
    """Mark every member complete, at its best checkpoint when early stopping restores it."""
    for m in run.members:
        if m.status == "training":
            m.status = "complete"
        best = m.best_iteration()
        registry.set_status(conn, run.backend, m.key, "complete", m.history,
                            model_iteration=best)
        if best is not None:
            registry.ensure_hot_state(conn, run.backend, m.key, best)
        served = best if best is not None else len(m.history)
        if served:  # checkpoint 0 has no deltas; loading the model decodes nothing
            run.backend.store_weights_raw(conn, m.key, served)


def finish(run: TrainingRun, conn: Connection, status: str = "complete") -> dict[str, Any]:
    """The key of the model the run returns: the only member, the best trial stored as the
    newest version, or the router version of a per-group run (``status``: how it ended)."""
    if not run.cohort:
        return run.members[0].key
    run.backend.lock_name(conn, run.name)  # another run of this name may allocate too
    key = {"name": run.name, "version": registry.next_version(conn, run.backend, run.name)}
    stored = {**run.options.to_json_dict(), "work_token": run.token}
    if run.cohort == "groups":
        _store_router(run, conn, key, stored, status)
    else:
        _store_best_trial(run, conn, key, stored, status)
    return key


def _store_router(
    run: TrainingRun, conn: Connection, key: dict[str, Any], stored: dict[str, Any],
    status: str,
) -> None:
    """The router version: each group's model version (its best trial's when every group
    searched, with the groups' leaderboards), the run's history."""
    opts = run.options
    if opts.grid:
        boards = {g: leaderboard(run, ms) for g, ms in by_group(run.members).items()}
        stored["groups"] = {g: board[0]["version"] for g, board in boards.items()}
        stored["selection"] = {"metric": run.selection_metric, "leaderboards": boards}
    else:
        stored["groups"] = {m.group: m.key["version"] for m in run.members}
    registry.create_model(
        conn, run.backend, key, spec=spec_of(opts.model), encoding=run.packed.encoding.to_json(),
        options=stored, query=run.query,
    )
    registry.set_status(conn, run.backend, key, status, run.history)


def _store_best_trial(
    run: TrainingRun, conn: Connection, key: dict[str, Any], stored: dict[str, Any],
    status: str,
) -> None:
    """The best trial's model checkpoint copied as version ``key``, with the leaderboard."""
    backend, opts = run.backend, run.options
    board = leaderboard(run)
    best = next(m for m in run.members if m.key["version"] == board[0]["version"])
    iteration = best.best_iteration() or len(best.history)
    stored.update(
        selection={"metric": run.selection_metric, "leaderboard": board,
                   "best_version": best.key["version"]},
        trial=best.trial, label=best.label,
    )
    registry.create_model(
        conn, backend, key, spec=spec_of(best.options.model),
        encoding=run.packed.encoding.to_json(), options=stored, query=run.query,
        parent=f"{run.name}:{best.key['version']}",
    )
    registry.copy_checkpoint(conn, backend, best.key, iteration, key)
    backend.archive(conn, key, iteration, (run.name, best.key["version"], iteration),
                    opts.block_bytes, opts.deltas)
    backend.store_weights_raw(conn, key, iteration)  # the trial's: shared, usually raw
    registry.set_status(conn, backend, key, status, best.history[:iteration],
                        model_iteration=iteration)


def leaderboard(run: TrainingRun, members: list[MemberRun] | None = None) -> list[dict[str, Any]]:
    """Trials (of ``members``, default all) best first by the selection metric at each
    one's model checkpoint."""
    lines = {}
    for m in run.members if members is None else members:
        at = m.best_iteration() or len(m.history)
        line = m.summary()
        if m.history:
            line.update(metrics_of(m.history[at - 1]))
        line["epochs"] = len(m.history)
        lines[m.member] = line
    order = rank(lines, run.selection_metric)
    return [{"rank": r + 1, **lines[i]} for r, i in enumerate(order)]


def model_so_far(run: TrainingRun) -> dict[str, Any]:
    """An interrupted run's model (``on_interrupt="return"``): the last completed
    iteration's, or for several models the best trial / the router so far. Re-raises
    :class:`KeyboardInterrupt` when no iteration completed."""
    if len(run.members) == 1:
        return run.members[0].key
    if not any(m.history for m in run.members):
        raise KeyboardInterrupt
    for m in run.members:
        m.status = "interrupted" if m.status == "training" else m.status
    with run.backend.engine.begin() as conn:
        return finish(run, conn, "interrupted")


__all__ = ["complete_members", "finish", "leaderboard", "model_so_far"]
