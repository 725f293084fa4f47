"""How rows become float32 features: the encoding metadata that travels with a model.

The database computes the statistics (means, deviations, category lists) with SQL aggregates
when the data is packed; the same :class:`Encoding` then encodes new rows identically, either in
SQL (:mod:`dbdl_magic.data.packing`) or on a DataFrame in the client
(:meth:`Encoding.encode_frame`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dbdl_magic.errors import InputError

NUMERIC, CATEGORICAL, ARRAY = "numeric", "categorical", "array"


@dataclass
class Feature:
    """One input column: ``numeric`` (standardised), ``categorical`` (one-hot) or ``array``."""

    name: str
    kind: str
    mean: float = 0.0
    std: float = 1.0
    categories: list[Any] = field(default_factory=list)
    shape: list[int] = field(default_factory=list)
    impute: float | None = None  # value used for NULLs (numeric), when imputation is on

    @property
    def width(self) -> int:
        """Number of float32 values this feature contributes to a row."""
        if self.kind == CATEGORICAL:
            return len(self.categories)
        if self.kind == ARRAY:
            return int(np.prod(self.shape))
        return 1


@dataclass
class Target:
    """The label column: class list (classification) or mean/std (regression)."""

    name: str
    task: str
    classes: list[Any] = field(default_factory=list)
    mean: float = 0.0
    std: float = 1.0

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1


@dataclass
class Encoding:
    """All features plus the target; serialised as JSON beside the packed table and model."""

    features: list[Feature]
    target: Target
    impute: str | None = None

    @property
    def width(self) -> int:
        return sum(f.width for f in self.features)

    @property
    def input_shape(self) -> list[int]:
        """Shape of one encoded row: ``[1, H, W]`` for a lone 2-D array (an image; ``[C, H, W]``
        stays as given), else flat."""
        if len(self.features) == 1 and self.features[0].kind == ARRAY:
            shape = self.features[0].shape
            return [1, *shape] if len(shape) == 2 else list(shape)
        return [self.width]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> Encoding:
        data = json.loads(text) if isinstance(text, str) else text
        return cls(
            features=[Feature(**f) for f in data["features"]],
            target=Target(**data["target"]),
            impute=data.get("impute"),
        )

    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def encode_frame(self, df: pd.DataFrame) -> np.ndarray:
        """Encode a DataFrame's feature columns exactly as the database packs them."""
        missing = [f.name for f in self.features if f.name not in df.columns]
        if missing:
            raise InputError(
                f"missing feature column(s) {', '.join(map(repr, missing))}; the model was "
                f"trained on {', '.join(self.feature_names())}"
            )
        blocks: list[np.ndarray] = []
        n = len(df)
        for f in self.features:
            col = df[f.name]
            if f.kind == NUMERIC:
                values = pd.to_numeric(col, errors="coerce").astype("float64").to_numpy()
                nulls = np.isnan(values) & col.notna().to_numpy()
                if nulls.any():
                    raise InputError(f"column {f.name!r} has non-numeric values")
                if np.isnan(values).any():
                    if f.impute is None:
                        raise InputError(
                            f"column {f.name!r} has {int(np.isnan(values).sum())} NULL value(s); "
                            "fill them or train with impute='mean'"
                        )
                    values = np.where(np.isnan(values), f.impute, values)
                blocks.append(((values - f.mean) / f.std).astype(np.float32)[:, None])
            elif f.kind == CATEGORICAL:
                onehot = np.zeros((n, len(f.categories)), dtype=np.float32)
                lookup = {_key(c): i for i, c in enumerate(f.categories)}
                for row, value in enumerate(col.tolist()):
                    index = lookup.get(_key(value))
                    if index is not None:
                        onehot[row, index] = 1.0
                blocks.append(onehot)
            else:
                width = f.width
                arr = (
                    np.stack([_as_array(v, width, f.name) for v in col.tolist()])
                    if n
                    else (np.zeros((0, width)))
                )
                blocks.append(((arr - f.mean) / f.std).astype(np.float32))
        flat = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0), np.float32)
        return flat.reshape(n, *self.input_shape)

    def decode_labels(self, indices: np.ndarray) -> np.ndarray:
        """Class indices → original labels."""
        return np.asarray(self.target.classes, dtype=object)[indices]


def _key(value: Any) -> Any:
    """Category lookup key: NaN/None never match, numpy scalars compare as Python values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _as_array(value: Any, width: int, name: str) -> np.ndarray:
    if isinstance(value, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(bytes(value), dtype="<f4").astype(np.float64)
    else:
        arr = np.asarray(value, dtype=np.float64).ravel()
    if arr.size != width:
        raise InputError(f"column {name!r} has an array of {arr.size} values; expected {width}")
    return arr
