"""Bundled real data sets (from scikit-learn) loaded into a database table for demos and tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine


def digits_frame(image: bool = False) -> pd.DataFrame:
    """scikit-learn's 8×8 digits: 1797 rows, pixel columns ``p0..p63`` (or one float32 blob
    column ``image`` when ``image``), target ``digit``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    if image:
        blobs = [row.astype("<f4").tobytes() for row in bunch.data]
        return pd.DataFrame({"image": blobs, "digit": bunch.target.astype(int)})
    df = pd.DataFrame(bunch.data.astype(np.float64), columns=[f"p{i}" for i in range(64)])
    df["digit"] = bunch.target.astype(int)
    return df


def breast_cancer_frame() -> pd.DataFrame:
    """scikit-learn's breast cancer data: 569 rows, 30 numeric features, target ``diagnosis``
    as text (``malignant``/``benign``)."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    cols = [c.replace(" ", "_") for c in bunch.feature_names]
    df = pd.DataFrame(bunch.data, columns=cols)
    df["diagnosis"] = np.asarray(bunch.target_names)[bunch.target]
    return df


def load_table(engine: Engine, table: str, frame: pd.DataFrame, replace: bool = True) -> int:
    """Write ``frame`` to ``table`` (replacing it by default); returns the row count."""
    frame.to_sql(
        table, engine, if_exists="replace" if replace else "fail", index=False, chunksize=10_000
    )
    return len(frame)
