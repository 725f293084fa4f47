"""dbdl_magic: train PyTorch models inside the connected database.

The public API is imported lazily so that the kernel package (``dbdl_magic.kernel``), which the
database server imports, pulls in nothing but torch, numpy and safetensors.
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
        from . import api

        return getattr(api, name)
    if name in ("DbdlError", "InputError", "SpecError", "InstallError", "TrainingError"):
        from . import errors

        return getattr(errors, name)
    if name in ("DBModel", "GroupedModel"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'dbdl_magic' has no attribute {name!r}")


def load_ipython_extension(shell: Any) -> None:
    """`%load_ext dbdl_magic`: register the magics and the `df.dl` accessor."""
    from .magics import load_ipython_extension as load

    load(shell)


__all__ = sorted(_API | {"__version__", "DBModel", "GroupedModel"})
