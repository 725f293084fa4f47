"""What a run trains on: the model specs checked, the warm-start source read, and the query's
rows staged, encoded and packed into buffers (one transaction)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from dbdl_magic.backends.base import Backend
from dbdl_magic.data.encoding import Encoding
from dbdl_magic.data.packing import PackedData, PackOptions, infer_encoding, pack, stage_query
from dbdl_magic.errors import InputError, SpecError
from dbdl_magic.kernel.netbuild import SpecError as KernelSpecError
from dbdl_magic.kernel.netbuild import build_network
from dbdl_magic.options import TrainOptions, pack_values
from dbdl_magic.store import registry
from dbdl_magic.store.spec import parse_spec
from dbdl_magic.training.policies import warm_encoding
from dbdl_magic.training.scaling import sync_rounds


def spec_of(model: Any) -> dict[str, Any]:
    """The parsed model spec (a bad one raises :class:`SpecError`)."""
    try:
        return parse_spec(model)
    except KernelSpecError as exc:
        raise SpecError(str(exc)) from exc


def check_spec_fits(spec: dict[str, Any], enc: Encoding, batch_size: int = 1) -> int:
    """Build the network once to check it fits the data and the kernels' size limits for
    batches of ``batch_size`` rows (before anything is packed); returns its parameter count."""
    try:
        net = build_network(spec, enc.input_shape, enc.target.n_outputs, batch_size)
        return sum(p.numel() for p in net.parameters())
    except KernelSpecError as exc:
        raise SpecError(f"model spec does not fit the data: {exc}") from exc


def check_columns(
    backend: Backend, conn: Connection, table: str, enc: Encoding, group_by: str | None = None
) -> None:
    """Refuse a validation query that lacks a feature, the target or the group column."""
    kinds = backend.column_kinds(conn, table)
    wanted = [*enc.feature_names(), enc.target.name] + ([group_by] if group_by else [])
    missing = [c for c in wanted if c not in kinds]
    if missing:
        raise InputError(f"the validation query lacks column(s) {', '.join(map(repr, missing))}")


def warm_start_source(backend: Backend, init_from: str) -> dict[str, Any]:
    """The stored model a warm start begins from (``init_from="name[:version]"``)."""
    name, _, version = str(init_from).partition(":")
    if version and not version.isdigit():
        raise InputError(f"init_from={init_from!r}: use 'name' or 'name:version'")
    with backend.engine.connect() as conn:
        try:
            number = int(version) if version else None
            return registry.read_model(conn, backend, name, number)
        except InputError as exc:
            raise InputError(f"init_from={init_from!r}: {exc}") from exc


def pack_options(opts: TrainOptions, trials: list[dict[str, Any]]) -> PackOptions:
    """How to pack for ``opts``: buffers hold whole batches of the largest searched size."""
    return PackOptions(**pack_values(opts, trials))


def segment_buffers(opts: TrainOptions, parameters: int) -> int | None:
    """The fewest buffers forced segments (``parallel=N``) need: two per segment per sync
    round (None: one process, or ``auto``, which packs before it knows)."""
    segments = opts.parallel if isinstance(opts.parallel, int) else 1
    if segments <= 1:
        return None
    return 2 * segments * sync_rounds(opts.sync_every, segments, parameters)


def pack_data(
    backend: Backend,
    query: str,
    opts: TrainOptions,
    tables: tuple[str, str, str],
    specs: list[dict[str, Any]],
    trials: list[dict[str, Any]],
    source: dict[str, Any] | None,
) -> PackedData:
    """Stage, encode and pack in one transaction into ``tables`` (staged query, staged
    validation query, packed buffers); the staged copies are dropped after. A warm start
    (``source``) encodes the new rows exactly as the source model did."""
    stage, vstage, packed = tables
    pack_opts = pack_options(opts, trials)
    with backend.engine.begin() as conn:
        stage_query(backend, conn, query, opts.params, stage, deterministic=True)
        encoding, n_rows = infer_encoding(backend, conn, stage, pack_opts)
        if source is not None:
            encoding = warm_encoding(
                encoding, Encoding.from_json(source["encoding"]), str(opts.init_from)
            )
        batch = max(1, min(pack_opts.batch_size, n_rows))
        pack_opts.n_parameters = max(check_spec_fits(s, encoding, batch) for s in specs)
        pack_opts.min_buffers = segment_buffers(opts, pack_opts.n_parameters)
        if opts.validation_query:
            stage_query(
                backend, conn, opts.validation_query, opts.params, vstage, "validation query",
                deterministic=True,
            )
            check_columns(backend, conn, vstage, encoding, opts.group_by)
        data = pack(
            backend, conn, stage, packed, encoding, n_rows, pack_opts,
            vstage if opts.validation_query else None,
        )
        backend.distribute_packed(conn, packed, opts.parallel)
        backend.drop_table(conn, stage)
        backend.drop_table(conn, vstage)
        return data


__all__ = [
    "check_columns",
    "check_spec_fits",
    "pack_data",
    "pack_options",
    "segment_buffers",
    "spec_of",
    "warm_start_source",
]
