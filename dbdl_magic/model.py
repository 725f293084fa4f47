"""The trained model as the notebook sees it: a torch module that carries its preprocessing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .encoding import Encoding


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no GPU here; use device='cpu' or 'auto'")
    return torch.device(device)


class DBModel(nn.Module):
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

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def task(self) -> str:
        return self.encoding.target.task

    @property
    def classes_(self) -> list[Any]:
        return list(self.encoding.target.classes)

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


def model_from_stored(row: dict[str, Any], device: str = "auto") -> DBModel:
    """Assemble a :class:`DBModel` from a stored model row and its last checkpoint."""
    from .kernel.netbuild import build_network
    from .kernel.state import decode_state

    encoding = Encoding.from_json(row["encoding"])
    net = build_network(row["spec"], encoding.input_shape, encoding.target.n_outputs)
    if row.get("state") is not None:
        net.load_state_dict(decode_state(row["state"]).model_tensors())
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
