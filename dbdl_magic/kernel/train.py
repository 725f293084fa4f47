"""Minibatch SGD over one packed buffer: the transition step of the training aggregate.

A packed buffer is ``x`` (float32, row-major, ``n × prod(input_shape)``) and ``y`` (int32 class
indices or float32 targets), in the byte order named by the config (``"<"`` little endian,
``">"`` big endian as PostgreSQL's ``float4send`` writes it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from . import KERNEL_VERSION
from .netbuild import build_network
from .state import TrainState, decode_state, encode_state

ProgressFn = Callable[[int], None]

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = {"classification": "cross_entropy", "regression": "mse"}


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chain)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def pick_device(requested: str = "auto") -> tuple[torch.device, str]:
    """Choose the device; returns ``(device, note)``. Falls back to the CPU without a GPU."""
    requested = (requested or "auto").lower()
    cuda = torch.cuda.is_available()
    if requested == "cpu":
        return torch.device("cpu"), "cpu requested"
    if cuda:
        return torch.device("cuda"), "cuda available"
    note = "no GPU visible to torch on the database host; ran on cpu"
    return torch.device("cpu"), note if requested != "auto" else "no GPU; cpu"


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count (cheap when unchanged)."""
    if threads and threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))


def make_optimizer(params: Any, options: dict[str, Any]) -> torch.optim.Optimizer:
    """Build the optimizer named in ``options`` (``sgd``/``adam``/``adamw``)."""
    name = options.get("name", "adam").lower()
    lr = float(options.get("lr", 1e-3))
    wd = float(options.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=float(options.get("momentum", 0.0)),
            nesterov=bool(options.get("nesterov", False)),
            weight_decay=wd,
        )
    betas = tuple(options.get("betas", (0.9, 0.999)))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd, foreach=False)
    if name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=betas,
            weight_decay=wd if "weight_decay" in options else 0.01,
            foreach=False,
        )
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def make_loss(task: str) -> nn.Module:
    """Cross-entropy for classification, MSE for regression."""
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def buffer_tensors(
    x: bytes, y: bytes | None, config: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode a packed buffer into ``(X, Y)`` tensors on ``device``."""
    order = config.get("byteorder", "<")
    shape = tuple(config["input_shape"])
    width = int(np.prod(shape))
    xs = np.frombuffer(x, dtype=f"{order}f4")
    if xs.size % width:
        raise ValueError(f"buffer of {xs.size} floats is not a multiple of {width} features")
    X = torch.from_numpy(xs.astype("<f4", copy=True).reshape(-1, *shape)).to(device)
    if y is None:
        return X, None
    if config["task"] == "classification":
        Y = torch.from_numpy(np.frombuffer(y, dtype=f"{order}i4").astype(np.int64)).to(device)
    else:
        ys = np.frombuffer(y, dtype=f"{order}f4").astype("<f4").reshape(-1, 1)
        Y = torch.from_numpy(ys).to(device)
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"buffer has {X.shape[0]} rows of x but {Y.shape[0]} targets")
    return X, Y


def network_for(config: dict[str, Any]) -> nn.Sequential:
    """The (untrained) network described by ``config``."""
    return build_network(config["spec"], config["input_shape"], int(config["n_outputs"]))


def initial_state(config: dict[str, Any]) -> bytes:
    """A fresh, seeded model as a state (iteration 0)."""
    torch.manual_seed(int(config.get("seed", 0)))
    net = network_for(config)
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    meta = {"kernel_version": KERNEL_VERSION, "device": "cpu"}
    return encode_state(TrainState(tensors, meta=meta))


def warm_start_state(config: dict[str, Any], source: bytes) -> tuple[bytes, list[str]]:
    """A fresh seeded model whose tensors are copied from ``source`` wherever name and shape
    match (a new output head keeps its fresh initialisation). Returns the state and the
    names of the tensors that were copied. Optimizer state starts empty."""
    torch.manual_seed(int(config.get("seed", 0)))
    net = network_for(config)
    fresh = net.state_dict()
    donor = decode_state(source).model_tensors()
    copied = [k for k, v in fresh.items() if k in donor and donor[k].shape == v.shape]
    tensors = {f"model.{k}": (donor[k] if k in copied else v) for k, v in fresh.items()}
    meta = {"kernel_version": KERNEL_VERSION, "device": "cpu"}
    return encode_state(TrainState(tensors, meta=meta)), copied


def seed_dropout(device: torch.device, seed: int) -> None:
    """Seed the generator that draws dropout masks on ``device``. Not ``torch.manual_seed``:
    besides the CPU it queues a lazy seed for every accelerator backend, each capturing a
    formatted stack trace (≈ 1 ms per call — per buffer, per member)."""
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


class Trainer:
    """A live network and optimizer, kept between buffers of one aggregate call."""

    def __init__(self, config: dict[str, Any], state: bytes, *, fresh: bool) -> None:
        """Decode ``state``; ``fresh`` starts this iteration's counters at zero."""
        self.config = config
        set_threads(config.get("threads"))
        self.device, self.device_note = pick_device(config.get("device", "auto"))
        decoded = decode_state(state)
        self.net = network_for(config)
        self.net.load_state_dict(decoded.model_tensors())
        self.net.to(self.device)
        self.frozen = [self.net[int(i)] for i in config.get("freeze") or []]
        for module in self.frozen:
            module.requires_grad_(False)
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, config.get("optimizer", {}))
        saved = decoded.optimizer_tensors()
        if saved:
            current = self.optimizer.state_dict()
            current["state"] = saved
            self.optimizer.load_state_dict(current)
        self.loss_fn = make_loss(config["task"])
        self.samples = 0 if fresh else decoded.samples
        self.loss_sum = 0.0 if fresh else decoded.loss_sum
        self.combines = 0 if fresh else decoded.combines
        self.meta = {} if fresh else dict(decoded.meta)

    def train_buffer(
        self,
        x: bytes,
        y: bytes,
        buffer_id: int,
        progress: ProgressFn | None = None,
        every: float = 0.5,
    ) -> None:
        """Run minibatch SGD over one buffer, rows in a fresh order for every epoch."""
        cfg = self.config
        X, Y = buffer_tensors(x, y, cfg, self.device)
        assert Y is not None
        n = X.shape[0]
        seed, epoch = int(cfg.get("seed", 0)), int(cfg.get("epoch", 0))
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, buffer_id))
        )
        seed_dropout(self.device, mix_seed(seed, epoch, buffer_id, 1))
        batch = int(cfg.get("batch_size", 64))
        net, opt, loss_fn = self.net, self.optimizer, self.loss_fn
        net.train()
        for module in self.frozen:  # frozen layers keep their weights and statistics
            module.eval()
        total = torch.zeros((), device=self.device)
        last = time.monotonic()
        for start in range(0, n, batch):
            idx = order[start : start + batch].to(self.device)
            xb, yb = X[idx], Y[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.shape[0]
            if progress is not None and time.monotonic() - last >= every:
                last = time.monotonic()
                progress(min(start + batch, n))
        self.samples += n
        self.loss_sum += float(total)
        if progress is not None:
            progress(n)

    def to_bytes(self) -> bytes:
        """The current state, ready to be emitted by the aggregate."""
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        for index, values in self.optimizer.state_dict()["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = value
                elif isinstance(value, (int, float)):
                    tensors[f"optim.{index}.{key}"] = torch.tensor(float(value))
        meta = dict(self.meta)
        meta.update(
            kernel_version=KERNEL_VERSION,
            device=self.device.type,
            device_note=self.device_note,
            threads=torch.get_num_threads(),
        )
        return encode_state(TrainState(tensors, self.samples, self.loss_sum, self.combines, meta))
