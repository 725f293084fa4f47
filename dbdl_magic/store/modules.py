"""The trained model as the notebook sees it: a torch module that carries its preprocessing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dbdl_magic.data.encoding import Encoding
from dbdl_magic.errors import InputError
from dbdl_magic.kernel.evaluate import metrics_from_stats, stats_to_bytes


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no GPU here; use device='cpu' or 'auto'")
    return torch.device(device)


class _EncodedModule(nn.Module):
    """What every model pulled from the database shares: an encoding and a device."""

    encoding: Encoding

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def task(self) -> str:
        return self.encoding.target.task

    @property
    def classes_(self) -> list[Any]:
        return list(self.encoding.target.classes)

    def evaluate(self, frame: pd.DataFrame) -> dict[str, Any]:
        """Loss and metrics of this model on ``frame`` (which must hold the target column),
        computed by the same statistics as the database's evaluate kernel."""
        enc = self.encoding
        if enc.target.name not in frame.columns:
            raise KeyError(f"the frame lacks the target column {enc.target.name!r}")
        outputs = self._outputs(frame)
        truth = frame[enc.target.name]
        config = {"task": self.task, "n_outputs": enc.target.n_outputs}
        if self.task == "classification":
            lookup = {c: i for i, c in enumerate(enc.target.classes)}
            y = np.array([lookup.get(v, -1) for v in truth.tolist()])
            if (y < 0).any():
                raise ValueError("the frame has target labels the model never saw")
            loss = torch.nn.functional.cross_entropy(outputs, torch.from_numpy(y)).item()
            k = enc.target.n_outputs
            pred = outputs.argmax(1).numpy()
            extra = np.bincount(y * k + pred, minlength=k * k).astype(np.float64)
        else:
            values = truth.to_numpy(dtype=np.float64)
            pred = outputs[:, 0].numpy().astype(np.float64) * enc.target.std + enc.target.mean
            scaled = (values - enc.target.mean) / enc.target.std
            loss = float(np.mean((outputs[:, 0].numpy() - scaled) ** 2))
            err = pred - values
            extra = np.array([err @ err, np.abs(err).sum(), values.sum(), values @ values])
        stats = np.concatenate([[len(truth), loss * len(truth)], extra])
        return metrics_from_stats(stats_to_bytes(stats), config)


class DBModel(_EncodedModule):
    """A trained network plus its encoding, history and provenance.

    Call it on a tensor of *encoded* features like any module; use :meth:`predict` /
    :meth:`predict_proba` on a DataFrame of raw columns.
    """

    def __init__(
        self,
        net: nn.Module,
        encoding: Encoding,
        spec: dict[str, Any],
        *,
        name: str,
        version: int,
        history: pd.DataFrame | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.encoding = encoding
        self.spec = spec
        self.name = name
        self.version = version
        self.history = history if history is not None else pd.DataFrame()
        self.info = info or {}
        self.status = self.info.get("status", "complete")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def encode(self, df: pd.DataFrame) -> torch.Tensor:
        """Encode raw feature columns exactly as the database did when packing."""
        return torch.from_numpy(self.encoding.encode_frame(df)).to(self.device)

    def _outputs(self, df: pd.DataFrame) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.net(self.encode(df)).cpu()
        finally:
            self.train(was_training)

    def predict_proba(self, df: pd.DataFrame) -> np.ndarray:
        """Class probabilities, one column per entry of :attr:`classes_`."""
        if self.task != "classification":
            raise TypeError(f"model {self.name!r} is a regression model; use predict()")
        return torch.softmax(self._outputs(df), dim=1).numpy()

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        """Labels (classification) or values in the target's units (regression)."""
        out = self._outputs(df)
        if self.task == "classification":
            return self.encoding.decode_labels(out.argmax(dim=1).numpy())
        t = self.encoding.target
        return out[:, 0].numpy().astype(np.float64) * t.std + t.mean

    def extra_repr(self) -> str:
        return f"name={self.name!r}, version={self.version}, task={self.task!r}"


def model_from_stored(
    row: dict[str, Any], device: str = "auto", weights: dict[str, torch.Tensor] | None = None
) -> DBModel:
    """Assemble a :class:`DBModel` from a stored model row and its checkpoint: ``weights``
    (the network's tensors, see :func:`dbdl_magic.store.registry.read_weights`) or the whole
    state in ``row["state"]``. Either is checked against the network the spec builds (names,
    shapes, dtypes, finite values)."""
    from dbdl_magic.kernel.limits import all_finite
    from dbdl_magic.kernel.netbuild import build_network
    from dbdl_magic.kernel.state import StateError, check_model_tensors, decode_state

    encoding = Encoding.from_json(row["encoding"])
    if weights is None:
        net = build_network(row["spec"], encoding.input_shape, encoding.target.n_outputs)
    else:
        net = _empty_network(row["spec"], encoding)
    if weights is None and row.get("state") is not None:
        weights = decode_state(row["state"]).model_tensors()
    elif weights is not None:
        check_model_tensors(weights, net.state_dict())
        bad = [k for k, v in weights.items() if v.is_floating_point() and not all_finite(v)]
        if bad:
            raise StateError(f"state tensor 'model.{bad[0]}' holds NaN or infinite values")
    if weights is not None:
        net.load_state_dict(weights)
    net.eval()
    model = DBModel(
        net,
        encoding,
        row["spec"],
        name=row["name"],
        version=row["version"],
        history=pd.DataFrame(row.get("history") or []),
        info={
            "status": row.get("status"),
            "iteration": row.get("iteration"),
            "error": row.get("error"),
            "query": row.get("query"),
        },
    )
    return model.to(resolve_device(device))


def _empty_network(spec: dict[str, Any], encoding: Encoding) -> nn.Sequential:
    """The spec's network with uninitialised tensors, for weights that overwrite every one of
    them: its layers are made without memory (``meta``) and then given empty storage, with no
    random initialisation (as long as reading the weights for a million parameters)."""
    from dbdl_magic.kernel.netbuild import check_budget, plan_network

    plan = plan_network(spec, encoding.input_shape, encoding.target.n_outputs)
    check_budget(plan, 1)
    with torch.device("meta"):
        layers = [layer.make() for layer in plan.layers]
    return nn.Sequential(*layers).to_empty(device="cpu")


def load_stored(
    conn: Any, backend: Any, name: str, version: int | None = None, device: str = "auto"
) -> DBModel | GroupedModel:
    """Load a stored model version as a module: its model checkpoint, and for a model
    selection run's best version the leaderboard (``model.leaderboard``).

    The router version of a per-group run (``group_by``) comes back as a
    :class:`GroupedModel` holding every group's model."""
    row = _read_module(conn, backend, name, version)
    if is_router(row):
        return grouped_from_stored(conn, backend, row, device)
    if row["iteration"] is None:
        raise InputError(f"model {name!r} version {row['version']} has no checkpoint yet")
    model = model_from_stored(row, device, row.pop("weights"))
    selection = (row.get("options") or {}).get("selection")
    if selection:
        model.leaderboard = pd.DataFrame(selection["leaderboard"])
        model.info["selection_metric"] = selection["metric"]
    return model


def _read_module(conn: Any, backend: Any, name: str, version: int | None) -> dict[str, Any]:
    """A stored model row plus ``weights``: its model checkpoint's network tensors, read from
    the weight blocks alone (:func:`~dbdl_magic.store.registry.read_weights`); a checkpoint
    without blocks comes whole (``state``) and ``weights`` is None."""
    from dbdl_magic.store import registry

    row = registry.read_model(conn, backend, name, version, with_state=False)
    row["weights"] = None
    if row["iteration"] is not None and not is_router(row):
        key = {"name": row["name"], "version": row["version"]}
        row["weights"] = registry.read_weights(conn, backend, key, int(row["iteration"]))
        if row["weights"] is None:
            row["state"] = backend.load_state(conn, key, int(row["iteration"]))
    return row


# -- one model per group ---------------------------------------------------------------------
#
# A per-group run (``group_by="country"``) stores each group's model as an ordinary version and
# then a *router* version whose options map every group value, as text, to its version. Group
# values are text because the database computes them as ``CAST(col AS TEXT)``; rows are routed
# in SQL with the same CAST, and client side by the rule of :func:`group_key_candidates`.


def is_router(row: dict[str, Any]) -> bool:
    """Whether a stored model row is the router of a per-group run."""
    return isinstance((row.get("options") or {}).get("groups"), dict)


def group_key_candidates(value: Any) -> list[str]:
    """The texts ``CAST(value AS TEXT)`` may have given in SQLite or PostgreSQL, best first.

    The rule: strings as they are; integers in decimal (``3``); floats with an integral value
    as ``3`` (PostgreSQL) or ``3.0`` (SQLite), other floats by their shortest round-trip form
    (``2.5``) or 15 significant digits (SQLite's); booleans as ``true``/``false``
    (PostgreSQL) or ``1``/``0`` (SQLite stores them as integers); anything else (dates,
    decimals) by ``str()``. NULL/NaN has no text: it matches no group.
    """
    if value is None:
        return []
    if isinstance(value, np.generic):
        text_form = str(value)
        value = value.item()
    else:
        text_form = None
    if isinstance(value, float) and np.isnan(value):
        return []
    if value is pd.NaT or value is pd.NA:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, bool):
        return ["true", "1", "True"] if value else ["false", "0", "False"]
    if isinstance(value, int):
        return [str(value)]
    if isinstance(value, float):
        out = (
            [str(int(value)), f"{value:.1f}", repr(value)]
            if value.is_integer() and abs(value) < 1e15
            else [repr(value), f"{value:.15g}", f"{value:.17g}"]
        )
        if text_form is not None:  # e.g. float32 0.1 → "0.1", as PostgreSQL prints a real
            out.insert(0, text_form)
        return list(dict.fromkeys(out))
    if isinstance(value, bytes):
        return [value.decode("utf-8", "replace")]
    out = [str(value)]
    iso = getattr(value, "isoformat", None)
    if callable(iso):
        out.append(iso())
    return list(dict.fromkeys(out))


def group_keys(values: Any, known: Any) -> list[str | None]:
    """The stored group (text) of every value, or None where no group matches."""
    known = set(known)
    cache: dict[Any, str | None] = {}
    out: list[str | None] = []
    for value in list(values):
        try:  # by type too: True == 1 == 1.0 but their texts differ
            hit = cache.get((type(value), value), ...)
            hashable = True
        except TypeError:
            hit, hashable = ..., False
        if hit is ...:
            hit = next((c for c in group_key_candidates(value) if c in known), None)
            if hashable:
                cache[(type(value), value)] = hit
        out.append(hit)
    return out


def unknown_groups_message(column: str, unknown: list[Any], known: Any, api: bool) -> str:
    """The error for rows whose group has no model: the column and up to 5 values."""
    shown = ", ".join("NULL" if v is None else repr(v) for v in unknown[:5])
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    known = sorted(known)
    trained = ", ".join(repr(k) for k in known[:10]) + (", ..." if len(known) > 10 else "")
    how = (
        "pass fallback='other_model[:version]' (a stored model that scores them)"
        if api
        else "pass fallback=<a DBModel, e.g. dl.load_model(con, 'global_model')>"
    )
    return (
        f"group_by column {column!r} has value(s) with no trained group model: {shown}{more} "
        f"(trained groups: {trained}); filter those rows out or {how}"
    )


class GroupedModel(_EncodedModule):
    """One :class:`DBModel` per value of ``group_by``, routed by that column.

    ``models`` maps each group value (as text, see :func:`group_key_candidates`) to its module;
    ``group_table`` has one line per group (version, status, epochs, rows, final metrics);
    ``history`` is the run's (one row per iteration, with every group's line in ``members``).
    When every group ran a search (``group_by`` with ``grid``), each group holds its best
    configuration and ``leaderboards`` maps every group to its trials, best first.
    :meth:`predict` / :meth:`predict_proba` route each row of a DataFrame by its
    ``group_by`` value; ``fallback`` (a :class:`DBModel`) scores rows of groups without a model.
    """

    def __init__(
        self,
        models: dict[str, DBModel],
        encoding: Encoding,
        spec: dict[str, Any],
        *,
        name: str,
        version: int,
        group_by: str,
        history: pd.DataFrame | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not models:
            raise InputError(f"per-group model {name!r} version {version} has no group models")
        self.members = nn.ModuleList(list(models.values()))
        self._index = {str(g): i for i, g in enumerate(models)}  # keys may hold dots etc.
        self.encoding = encoding
        self.spec = spec
        self.name = name
        self.version = version
        self.group_by = group_by
        self.history = history if history is not None else pd.DataFrame()
        self.info = info or {}
        self.status = self.info.get("status", "complete")
        self.group_table = self._group_table()
        self.leaderboards: dict[str, pd.DataFrame] = {}

    # -- what it holds ----------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, DBModel]:
        return {g: self.members[i] for g, i in self._index.items()}

    @property
    def groups(self) -> list[str]:
        return list(self._index)

    def __getitem__(self, group: Any) -> DBModel:
        key = group_keys([group], self._index)[0]
        if key is None:
            raise KeyError(unknown_groups_message(self.group_by, [group], self._index, False))
        return self.members[self._index[key]]

    def __len__(self) -> int:
        return len(self._index)

    def _group_table(self) -> pd.DataFrame:
        lines = []
        for group, model in self.models.items():
            rows = model.history.to_dict("records") if len(model.history) else []
            at = model.info.get("iteration")
            final = rows[int(at) - 1] if at and 0 < int(at) <= len(rows) else (
                rows[-1] if rows else {})
            line: dict[str, Any] = {
                "group": group,
                "version": model.version,
                "status": model.status,
                "epochs": len(rows),
                "train_rows": int(final.get("samples") or 0),
                "samples": int(sum(r.get("samples") or 0 for r in rows)),
            }
            line.update({
                k: v for k, v in final.items()
                if k.startswith(("train_", "val_")) and k != "train_seconds"
            })
            lines.append(line)
        return pd.DataFrame(lines)

    # -- routing ----------------------------------------------------------------------------------
    def route(self, values: Any) -> list[str | None]:
        """The group key of every value (None: no group model)."""
        return group_keys(values, self._index)

    def forward(self, x: torch.Tensor, groups: Any) -> torch.Tensor:
        """Outputs for *encoded* rows ``x``, row ``i`` by the model of group ``groups[i]``."""
        keys = self.route(groups)
        if len(keys) != len(x):
            raise ValueError(f"{len(x)} rows but {len(keys)} group values")
        unknown = sorted({str(g) for g, k in zip(groups, keys, strict=True) if k is None})
        if unknown:
            raise InputError(unknown_groups_message(self.group_by, unknown, self._index, False))
        out: torch.Tensor | None = None
        index = torch.as_tensor([self._index[str(k)] for k in keys], device=x.device)
        for i in torch.unique(index).tolist():
            rows = (index == i).nonzero(as_tuple=True)[0]
            part = self.members[i](x[rows])
            if out is None:
                out = part.new_empty((len(x), *part.shape[1:]))
            out[rows] = part
        if out is None:
            return x.new_empty((0, self.encoding.target.n_outputs))
        return out

    def _split(self, df: pd.DataFrame, fallback: Any) -> list[tuple[Any, np.ndarray]]:
        """``(model, row positions)`` for every model that scores some rows of ``df``."""
        if self.group_by not in df.columns:
            raise InputError(
                f"the frame lacks the group_by column {self.group_by!r} that routes rows to "
                "the group models"
            )
        if isinstance(fallback, str):
            raise TypeError(
                "fallback must be a module here: load it first with "
                f"dl.load_model(con, {fallback!r})"
            )
        values = df[self.group_by].tolist()
        keys = self.route(values)
        parts: dict[Any, list[int]] = {}
        unknown: dict[str, Any] = {}
        for pos, (value, key) in enumerate(zip(values, keys, strict=True)):
            if key is None:
                unknown.setdefault(str(value), value)
            parts.setdefault(key, []).append(pos)
        if unknown and fallback is None:
            raise InputError(
                unknown_groups_message(self.group_by, list(unknown.values()), self._index, False)
            )
        if unknown:
            _check_fallback(self, fallback)
        return [
            (fallback if key is None else self.members[self._index[key]], np.asarray(pos))
            for key, pos in parts.items()
        ]

    def _assemble(self, df: pd.DataFrame, fallback: Any, method: str) -> np.ndarray:
        parts = self._split(df, fallback)
        if not parts:
            return getattr(self.members[0], method)(df.iloc[:0])
        pieces = [getattr(model, method)(df.iloc[pos]) for model, pos in parts]
        order = np.concatenate([pos for _, pos in parts])
        joined = np.concatenate(pieces)
        out = np.empty_like(joined)
        out[order] = joined
        return out

    def predict_proba(self, df: pd.DataFrame, fallback: DBModel | None = None) -> np.ndarray:
        """Class probabilities (columns: :attr:`classes_`), each row by its group's model."""
        if self.task != "classification":
            raise TypeError(f"model {self.name!r} is a regression model; use predict()")
        if fallback is not None and not isinstance(fallback, str):
            fb = list(getattr(fallback, "classes_", []))
            if fb != self.classes_:
                raise InputError(
                    f"fallback model {getattr(fallback, 'name', '?')!r} has classes {fb}, not "
                    f"{self.classes_}; probabilities need the same classes"
                )
        return self._assemble(df, fallback, "predict_proba")

    def predict(self, df: pd.DataFrame, fallback: DBModel | None = None) -> np.ndarray:
        """Labels or values, each row by the model of its ``group_by`` value."""
        return self._assemble(df, fallback, "predict")

    def _outputs(self, df: pd.DataFrame, fallback: DBModel | None = None) -> torch.Tensor:
        """Raw network outputs (for ``df.dl.evaluate``), each row by its group's model."""
        parts = self._split(df, fallback)
        if not parts:
            return self.members[0]._outputs(df.iloc[:0])
        pieces = [model._outputs(df.iloc[pos]) for model, pos in parts]
        order = torch.from_numpy(np.concatenate([pos for _, pos in parts]))
        joined = torch.cat(pieces)
        out = torch.empty_like(joined)
        out[order] = joined
        return out

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, version={self.version}, task={self.task!r}, "
            f"group_by={self.group_by!r}, groups={len(self)}"
        )


def _check_fallback(model: GroupedModel, fallback: Any) -> None:
    if isinstance(fallback, GroupedModel) or not hasattr(fallback, "predict"):
        raise TypeError("fallback must be an ordinary DBModel (one model for every row)")
    if getattr(fallback, "task", model.task) != model.task:
        raise InputError(
            f"fallback model {fallback.name!r} is a {fallback.task} model but "
            f"{model.name!r} is a {model.task} model"
        )


def grouped_from_stored(
    conn: Any, backend: Any, row: dict[str, Any], device: str = "auto"
) -> GroupedModel:
    """Assemble the :class:`GroupedModel` of a router row: every group's model checkpoint."""
    options = row["options"]
    models: dict[str, DBModel] = {}
    for group, version in options["groups"].items():
        member = _read_module(conn, backend, row["name"], int(version))
        if member["iteration"] is None:
            raise InputError(
                f"model {row['name']!r} version {version} (group {group!r}) has no checkpoint"
            )
        models[str(group)] = model_from_stored(member, "cpu", member.pop("weights"))
    grouped = GroupedModel(
        models,
        Encoding.from_json(row["encoding"]),
        row["spec"],
        name=row["name"],
        version=row["version"],
        group_by=options.get("group_by") or "",
        history=pd.DataFrame(row.get("history") or []),
        info={
            "status": row.get("status"),
            "iteration": None,
            "error": row.get("error"),
            "query": row.get("query"),
            "group_by": options.get("group_by"),
            "groups": {str(g): int(v) for g, v in options["groups"].items()},
        },
    )
    selection = options.get("selection")
    if selection:
        boards = selection["leaderboards"]
        grouped.leaderboards = {str(g): pd.DataFrame(b) for g, b in boards.items()}
        grouped.info["selection_metric"] = selection["metric"]
    return grouped.to(resolve_device(device))
