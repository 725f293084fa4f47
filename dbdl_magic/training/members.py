"""The members of a run: one model per group, per searched configuration, or the only one.

Here is what a member is (:class:`MemberRun`), which members a run has (:func:`member_plan`),
the configuration its kernels get (:func:`kernel_config`), and how a new run creates and claims
their model versions (:func:`create_members`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy.engine import Connection

from dbdl_magic.backends.base import Backend
from dbdl_magic.data.encoding import Encoding
from dbdl_magic.data.packing import PackedData
from dbdl_magic.display import metrics_of
from dbdl_magic.errors import InputError, TrainingError
from dbdl_magic.kernel.train import initial_state, warm_start_state
from dbdl_magic.options import TrainOptions
from dbdl_magic.options import kernel_config as options_kernel_config
from dbdl_magic.store import registry
from dbdl_magic.training.policies import EarlyStopping, frozen_layers
from dbdl_magic.training.prepare import spec_of
from dbdl_magic.training.selection import label as trial_label
from dbdl_magic.training.selection import trial_options

if TYPE_CHECKING:
    from dbdl_magic.training.run import TrainingRun


@dataclass
class MemberRun:
    """One model of a run: one per group, one per searched configuration, or the only one."""

    member: int
    key: dict[str, Any]
    config: dict[str, Any]
    options: TrainOptions
    label: str = ""
    group: str | None = None
    trial: dict[str, Any] | None = None
    status: str = "training"  # training | halved | early-stopped | complete | interrupted
    train_rows: int = 0
    validation_rows: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopper: EarlyStopping | None = None

    def summary(self) -> dict[str, Any]:
        """The member's line in the run's table: status plus its last metrics."""
        last = self.history[-1] if self.history else {}
        out: dict[str, Any] = {"member": self.member, "label": self.label, "status": self.status,
                               "version": self.key["version"], "epoch": last.get("epoch", 0)}
        out.update(metrics_of(last))
        out["samples"] = last.get("samples", 0)
        return out

    def best_iteration(self) -> int | None:
        """The checkpoint that is the model when early stopping restores the best one."""
        if self.stopper is not None and self.options.restore_best:
            return self.stopper.best_iteration if self.stopper.best_iteration > 0 else None
        return None


class PlannedMember(NamedTuple):
    """A member before it has a model version: its label, group value and trial."""

    label: str
    group: str | None
    trial: dict[str, Any] | None


def by_group(members: list[MemberRun]) -> dict[str | None, list[MemberRun]]:
    """Members by group, in member order (one entry, ``None``, without group_by)."""
    out: dict[str | None, list[MemberRun]] = {}
    for m in members:
        out.setdefault(m.group, []).append(m)
    return out


def member_plan(
    data: PackedData, trials: list[dict[str, Any]], group_by: str | None
) -> list[PlannedMember]:
    """Every member of a run, in member order: one per group (times every trial when each
    group searches), one per trial, or the only one."""
    if data.groups is not None:
        if trials:  # a search in every group: each group picks its best configuration
            return [PlannedMember(f"{group_by}={g} {trial_label(t)}", g, t)
                    for g in data.groups for t in trials]
        return [PlannedMember(f"{group_by}={g}", g, None) for g in data.groups]
    if trials:
        return [PlannedMember(trial_label(t), None, t) for t in trials]
    return [PlannedMember("", None, None)]


def kernel_config(
    spec: dict[str, Any], enc: Encoding, opts: TrainOptions, backend: Backend, run_token: str
) -> dict[str, Any]:
    """The configuration the kernels get for one member (its ``epoch``, ``threads`` and
    ``parallel`` are set per iteration)."""
    return options_kernel_config(
        opts, spec=spec, input_shape=enc.input_shape, n_outputs=enc.target.n_outputs,
        task=enc.target.task, byteorder=backend.byteorder,
        target_scale=[enc.target.mean, enc.target.std], run=run_token,
        freeze=frozen_layers(opts.freeze, spec, enc), epoch=0,
    )


def new_member(
    run: TrainingRun, i: int, version: int, planned: PlannedMember
) -> MemberRun:
    """Member ``i`` of ``run`` (its trial's options applied), training model ``version``."""
    opts = trial_options(run.options, planned.trial) if planned.trial else run.options
    data = run.packed
    config = kernel_config(spec_of(opts.model), data.encoding, opts, run.backend, run.token)
    rows = (data.groups or {}).get(planned.group or "", {})
    return MemberRun(
        i, {"name": run.name, "version": version}, {**config, "member": i}, opts,
        planned.label, planned.group, planned.trial,
        train_rows=rows.get("train", data.n_train),
        validation_rows=rows.get("validation", data.n_val),
        stopper=EarlyStopping(opts) if opts.patience else None,
    )


def stored_options(run: TrainingRun, m: MemberRun) -> dict[str, Any]:
    """A member's options as its model version stores them (with the run's work token, the
    packed data's fingerprint and, on SQLite, the session that trains it)."""
    stored = {**m.options.to_json_dict(), "work_token": run.token,
              "data_fingerprint": run.packed.fingerprint}
    if run.session is not None and run.session.record:
        stored["session"] = run.session.record
    if run.cohort:
        stored.update(member=m.member, label=m.label, group=m.group, trial=m.trial)
    return stored


def claim(run: TrainingRun, conn: Connection, versions: list[int]) -> None:
    """Take model versions for the run's session, or raise when another session trains one
    of them (inside the transaction that holds the name's lock)."""
    assert run.session is not None
    taken = run.session.claim(conn, run.name, versions)
    if taken:
        raise TrainingError(
            f"model {run.name!r} version {taken[0]} is being trained by another session; "
            "wait for that run to end (or stop it) first"
        )


def create_members(
    run: TrainingRun, conn: Connection, trials: list[dict[str, Any]],
    source: dict[str, Any] | None,
) -> None:
    """A new model version and its checkpoint 0 for every member (from ``source``'s weights
    when the run warm-starts), claimed for the run's session."""
    backend = run.backend
    backend.lock_name(conn, run.name)  # until this transaction commits the new rows
    first_version = registry.next_version(conn, backend, run.name)
    plan = member_plan(run.packed, trials, run.options.group_by)
    claim(run, conn, list(range(first_version, first_version + len(plan))))
    for i, planned in enumerate(plan):
        member = new_member(run, i, first_version + i, planned)
        registry.create_model(
            conn,
            backend,
            member.key,
            spec=member.config["spec"],
            encoding=run.packed.encoding.to_json(),
            options=stored_options(run, member),
            query=run.query,
            parent=f"{source['name']}:{source['version']}" if source else None,
        )
        state, parent = _first_state(run, member, source)
        registry.write_checkpoint(conn, backend, member.key, 0, state)
        backend.archive(conn, member.key, 0, parent, member.options.block_bytes,
                        member.options.deltas)
        run.members.append(member)


def _first_state(
    run: TrainingRun, member: MemberRun, source: dict[str, Any] | None
) -> tuple[bytes, tuple[str, int, int] | None]:
    """A member's checkpoint 0 and the stored checkpoint it derives from (a warm start's)."""
    if source is None:
        return initial_state(member.config), None
    state, copied = warm_start_state(member.config, source["state"])
    if not copied:
        raise InputError(
            f"init_from={run.options.init_from!r}: no layer of that model fits "
            "this architecture (no tensor has the same name and shape)"
        )
    return state, (source["name"], source["version"], source["iteration"])


__all__ = [
    "MemberRun",
    "PlannedMember",
    "by_group",
    "claim",
    "create_members",
    "kernel_config",
    "member_plan",
    "new_member",
    "stored_options",
]
