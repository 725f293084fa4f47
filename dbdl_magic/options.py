"""Training options: one validated dataclass, shared by the API, the magics and the accessor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .kernel.train import OPTIMIZERS


@dataclass
class TrainOptions:
    """Every option of :func:`dbdl_magic.train`. Unknown names are refused with the valid list."""

    target: str
    model: Any = "mlp:64,32"
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None
    validation: float | None = 0.2
    validation_query: str | None = None
    task: str = "auto"
    features: list[str] | None = None
    impute: str | None = None
    max_categories: int = 100
    image_shape: list[int] | None = None
    rows_per_buffer: int | None = None
    seed: int = 0
    device: str = "auto"
    db_device: str = "auto"
    parallel: int = 1
    threads: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # early stopping (on when ``patience`` is set) and what Ctrl-C does
    patience: int | None = None
    monitor: str = "val_loss"
    min_delta: float = 0.0
    restore_best: bool = True
    on_interrupt: str = "raise"

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TrainOptions:
        """Build and validate; an unknown keyword raises :class:`InputError` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InputError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; valid options: "
                f"{', '.join(sorted(names))}"
            )
        if "target" not in kwargs or not kwargs["target"]:
            raise InputError("the 'target' option (the label column) is required")
        options = cls(**kwargs)
        options.validate()
        return options

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first bad option."""

        def need(ok: bool, option: str, rule: str) -> None:
            if not ok:
                raise InputError(f"option {option}={getattr(self, option)!r}: {rule}")

        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an integer ≥ 1")
        need(isinstance(self.lr, (int, float)) and self.lr > 0, "lr", "must be a positive number")
        need(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            "batch_size",
            "must be an integer ≥ 1",
        )
        need(
            str(self.optimizer).lower() in OPTIMIZERS,
            "optimizer",
            f"must be one of {', '.join(OPTIMIZERS)}",
        )
        need(self.momentum >= 0, "momentum", "must be ≥ 0")
        need(
            not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
            "nesterov",
            "needs optimizer='sgd' with momentum > 0",
        )
        need(
            self.validation is None or 0 <= float(self.validation) < 1,
            "validation",
            "must be a fraction in [0, 1)",
        )
        need(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        need(self.db_device in ("auto", "cpu", "cuda"), "db_device", "must be auto, cpu or cuda")
        need(
            isinstance(self.parallel, int) and self.parallel >= 1,
            "parallel",
            "must be an integer ≥ 1 (the number of segments training in parallel)",
        )
        need(
            self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
            "threads",
            "must be an integer ≥ 1",
        )
        need(
            isinstance(self.max_categories, int) and self.max_categories >= 1,
            "max_categories",
            "must be an integer ≥ 1",
        )
        need(
            self.on_interrupt in ("raise", "return"),
            "on_interrupt",
            "must be 'raise' or 'return' (return the last completed iteration's model)",
        )
        need(
            self.patience is None or (isinstance(self.patience, int) and self.patience >= 1),
            "patience",
            "must be an integer ≥ 1 (iterations without improvement before stopping)",
        )
        need(self.min_delta >= 0, "min_delta", "must be ≥ 0")
        need(
            self.task in ("auto", "classification", "regression"),
            "task",
            "must be auto, classification or regression",
        )
        if self.image_shape is not None:
            shape = self.image_shape
            if isinstance(shape, str):
                shape = [int(s) for s in shape.lower().replace("x", ",").split(",") if s]
            need(
                all(isinstance(s, int) and s > 0 for s in shape),
                "image_shape",
                "must be positive sizes, e.g. (8, 8)",
            )
            self.image_shape = list(shape)

    def optimizer_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.optimizer.lower(), "lr": float(self.lr)}
        if self.optimizer == "sgd":
            out.update(momentum=self.momentum, nesterov=self.nesterov)
        if self.weight_decay is not None:
            out["weight_decay"] = float(self.weight_decay)
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """Options as stored with the model (the model spec is stored separately)."""
        data = dataclasses.asdict(self)
        data.pop("model")
        data["params"] = {k: repr(v) for k, v in self.params.items()}
        return data
