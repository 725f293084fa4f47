"""``resume=True``: continue an interrupted or failed run from its last checkpoints.

The stored versions to continue are found and checked against this run (same query, model,
options and packed data; :func:`resumable`), claimed for this run's session, and rebuilt as
members whose early-stopping and halving decisions are replayed from their committed histories
(:func:`resume_members`): those decisions depend on nothing else.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection

from dbdl_magic.errors import InputError
from dbdl_magic.options import TrainOptions
from dbdl_magic.store import registry
from dbdl_magic.training.hooks import Iteration
from dbdl_magic.training.members import (
    PlannedMember,
    claim,
    member_plan,
    new_member,
    stored_options,
)
from dbdl_magic.training.prepare import spec_of
from dbdl_magic.training.selection import trial_options

if TYPE_CHECKING:
    from dbdl_magic.training.run import TrainingRun

log = logging.getLogger(__name__)


def resumable(run: TrainingRun) -> list[dict[str, Any]] | None:
    """The stored versions to continue: the model, or every member of a group_by / grid
    run (each with its stored history and last checkpoint), claimed for the run's session
    (another session still training them is an error). The run must have the same name,
    query and options, and not be complete. None when there is nothing to resume (no run
    of that name, or none with a checkpoint): the run starts afresh and warns so. Work
    tables a killed client left behind are dropped here; so is the provisional router /
    best copy of an interrupted cohort (the resumed run writes it again)."""
    backend = run.backend
    with backend.engine.connect() as conn:
        try:
            latest = registry.read_model(conn, backend, run.name, with_state=False)
        except InputError:
            return _fresh(run, f"there is no run named {run.name!r}")
        token = latest["options"].get("work_token")
        rows = registry.read_run(conn, backend, run.name, token) if token else []
    members = _stored_members(run, latest, rows)
    if any(row["iteration"] is None for row in members):
        return _fresh(run, f"model {run.name!r} version {latest['version']} has no "
                      "checkpoint to resume from")
    for row in members:
        different = differences(run, row)
        if different:
            raise InputError(
                f"cannot resume {run.name!r}: {', '.join(different)} differ(s) from the "
                "interrupted run; resume with the same query and options"
            )
    _take_over(run, members, rows, token)
    return members


def _fresh(run: TrainingRun, why: str) -> None:
    """``resume=True`` with nothing to resume: say so (a warning the API and the notebook
    show) and start a new run."""
    message = f"resume=True: {why}; starting a new run of {run.name!r} instead"
    log.info("dbdl: %s", message)
    # the frame of dl.train: _fresh < resumable < TrainingRun._train < .execute < dl.train
    warnings.warn(message, UserWarning, stacklevel=5)


def _stored_members(
    run: TrainingRun, latest: dict[str, Any], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The stored rows of the versions to continue (``latest``: the name's newest version,
    ``rows``: the versions of its run); refuses a complete run, or one of the other kind
    (one model / a cohort)."""
    if latest["status"] == "complete":
        raise InputError(
            f"model {run.name!r} version {latest['version']} is complete; nothing to resume "
            "(train again without resume=True for a new version)"
        )
    cohort_version = any(k in latest["options"] for k in ("member", "groups", "selection"))
    if run.cohort:
        members = [r for r in rows if r["options"].get("member") is not None]
    else:
        members = [] if cohort_version else [latest]
    if not members:
        raise InputError(
            f"cannot resume {run.name!r}: its last run "
            f"{'was not' if run.cohort else 'was'} a group_by / grid run; resume with the "
            "same query and options"
        )
    return members


def _take_over(
    run: TrainingRun, members: list[dict[str, Any]], rows: list[dict[str, Any]],
    token: str | None,
) -> None:
    """Claim the versions for the run's session; drop the interrupted run's work tables and
    its provisional router / best-trial copy."""
    backend = run.backend
    with backend.engine.begin() as conn:
        backend.lock_name(conn, run.name)
        claim(run, conn, [row["version"] for row in members])
        for prefix in ("stage", "vstage", "packed") if token else ():
            backend.drop_table(conn, backend.table(f"{prefix}_{token}"))
        for row in rows:
            if row["options"].get("member") is None and run.cohort:
                registry.delete_model(conn, backend, run.name, row["version"])


def differences(run: TrainingRun, row: dict[str, Any]) -> list[str]:
    """What differs between a stored version (a member: its trial applied) and this run:
    the query, the model, options that shape the data or the updates."""
    trial = row["options"].get("trial")
    opts = trial_options(run.options, trial) if trial else run.options
    mine = json.loads(json.dumps(opts.to_json_dict(), default=str))  # as stored
    different = [k for k in TrainOptions.RESUME_KEYS if row["options"].get(k) != mine.get(k)]
    if row["query"] != run.query:
        different.insert(0, "query")
    if row["spec"] != spec_of(opts.model):
        different.insert(0, "model")
    return different


def resume_members(
    run: TrainingRun, conn: Connection, trials: list[dict[str, Any]],
    stored: list[dict[str, Any]],
) -> int:
    """Continue the ``stored`` versions (:func:`resumable`) as the run's members, with their
    committed histories and the early stopping / halving decisions replayed from those
    histories; marks them training again. Returns the first epoch still to train."""
    plan = member_plan(run.packed, trials, run.options.group_by)
    if not run.cohort:
        plan = plan[:1]
    _check_same_data(run, plan, stored)
    committed: dict[int, list[dict[str, Any]]] = {}
    for i, (planned, row) in enumerate(zip(plan, stored, strict=True)):
        run.members.append(new_member(run, i, row["version"], planned))
        committed[i] = list(row["history"] or [])[: int(row["iteration"])]
    done = _replay(run, committed)
    for m in run.members:
        if m.status == "training":
            registry.ensure_hot_state(conn, run.backend, m.key, len(m.history))
        registry.set_status(conn, run.backend, m.key, "training", m.history)
        registry.set_options(conn, run.backend, m.key, stored_options(run, m))
    return done


def _check_same_data(
    run: TrainingRun, plan: list[PlannedMember], stored: list[dict[str, Any]]
) -> None:
    """Refuse to resume on other packed data (rows, split, shuffle: the fingerprint) or with
    other groups / trials than the stored members'."""
    before = {r["options"].get("data_fingerprint") for r in stored} - {None}
    if before and before != {run.packed.fingerprint}:
        raise InputError(
            f"cannot resume {run.name!r}: its training rows, split or shuffle differ from "
            "the interrupted run's (the data changed since); train a new version instead"
        )
    if [(p.label, p.group) for p in plan] != [
        (r["options"].get("label", ""), r["options"].get("group")) for r in stored
    ]:
        raise InputError(
            f"cannot resume {run.name!r}: the {'groups' if run.packed.groups else 'trials'} "
            "differ from the interrupted run's"
        )


def _replay(run: TrainingRun, committed: dict[int, list[dict[str, Any]]]) -> int:
    """Feed the members' ``committed`` history rows through the run's hooks, epoch by epoch,
    to the members live at each epoch (monitors are not told); returns the epochs done.
    Raises when the checkpoints do not line up with the decisions replayed."""
    done = max(len(h) for h in committed.values())
    for epoch in range(done):
        alive = [m for m in run.members if m.status == "training"]
        if not alive or any(len(committed[m.member]) <= epoch for m in alive):
            break
        rows = {m.member: committed[m.member][epoch] for m in alive}
        first = next(iter(rows.values()))
        run.end_iteration(Iteration(epoch + 1, alive, rows, first["seconds"],
                                    first["train_seconds"], replayed=True))
    if any(len(m.history) != len(committed[m.member]) for m in run.members):
        raise InputError(
            f"cannot resume {run.name!r}: its members' checkpoints do not line up with "
            "the run's early stopping / halving (were epochs, patience or halving changed?)"
        )
    return done


__all__ = ["differences", "resumable", "resume_members"]
