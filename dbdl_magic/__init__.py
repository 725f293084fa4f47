"""dbdl_magic: train PyTorch models inside the connected database.

The public API is imported lazily so that the kernel package (``dbdl_magic.kernel``), which the
database server imports, pulls in nothing but torch, numpy, safetensors and zstandard.

The package's folders are its layers, each importing only the ones below it (checked by
import-linter, see ``.importlinter``)::

    notebook/, cli.py      the fronts: magics, monitors, figures, the df.dl accessor
    api.py                 connect, install, train, predict, load_model, list_models
    training/, serving/    training runs and their policies; prediction with stored models
    store/                 registry of models and checkpoints, weight blocks, model modules
    data/                  encoding and packing rows into buffers inside the database
    backends/              SQL phrasing per dialect (SQLite, PostgreSQL/Citus/Greenplum)
    kernel/                the math that runs inside the database (torch, numpy only)

``options``, ``errors``, ``display``, ``events`` and ``datasets`` are shared vocabulary, importable
by all.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "connect",
    "install",
    "train",
    "load_model",
    "list_models",
    "predict_in_database",
    "delete_model",
    "predict",
    "serving_copy",
    "Database",
    "InstallWarning",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        from dbdl_magic import api
        return getattr(api, name)
    if name in ("DbdlError", "InputError", "SpecError", "InstallError", "TrainingError"):
        from dbdl_magic import errors
        return getattr(errors, name)
    if name in ("DBModel", "GroupedModel"):
        from dbdl_magic.store import modules
        return getattr(modules, name)
    if name == "Callbacks":
        from dbdl_magic.events import Callbacks
        return Callbacks
    raise AttributeError(f"module 'dbdl_magic' has no attribute {name!r}")


def load_ipython_extension(shell: Any) -> None:
    """`%load_ext dbdl_magic`: register the magics and the `df.dl` accessor."""
    from dbdl_magic.notebook.magics import load_ipython_extension as load

    load(shell)


__all__ = sorted(_API | {"__version__", "DBModel", "GroupedModel", "Callbacks"})
