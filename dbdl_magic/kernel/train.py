"""Minibatch SGD over one packed buffer: the transition step of the training aggregate.

A packed buffer is ``x`` (float32, row-major, ``n × prod(input_shape)``) and ``y`` (int32 class
indices or float32 targets), in the byte order named by the config (``"<"`` little endian,
``">"`` big endian as PostgreSQL's ``float4send`` writes it).

Everything that arrives is checked before use: the config (:func:`limits.check_config`), the
spec and its size (:mod:`netbuild`), the state against the network (:mod:`state`), and each
buffer: whole rows of finite features, one target per row, class labels in
``[0, n_outputs)``, finite regression targets. One vectorised pass per buffer does it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from dbdl_magic.kernel import KERNEL_VERSION
from dbdl_magic.kernel.errors import ConfigError, DataError, KernelError, clean_errors
from dbdl_magic.kernel.limits import (
    OPTIMIZERS,
    all_finite,
    check_config,
    check_freeze,
    clamp_threads,
)
from dbdl_magic.kernel.netbuild import NetworkPlan, check_budget, plan_network
from dbdl_magic.kernel.state import (
    StateError,
    TrainState,
    check_model_tensors,
    check_optimizer_tensors,
    decode_state,
    encode_state,
)

ProgressFn = Callable[[int], None]


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
    """Set torch's intra-op thread count, clamped to this server process's cores (cheap when
    unchanged). More threads than the host allows would crash the server process."""
    count = clamp_threads(threads)
    if count is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)


def given(config: dict[str, Any], key: str, where: str = "config") -> Any:
    """``config[key]``, which the training run always sends (the kernels restate no option's
    default); a missing one is a :class:`ConfigError` naming it."""
    if not isinstance(config, dict) or key not in config:
        raise ConfigError(f"{where} {key} is missing (the training run sends every option's "
                          "value explicitly)")
    return config[key]


def make_optimizer(params: Any, options: dict[str, Any]) -> torch.optim.Optimizer:
    """Build the optimizer named in ``options`` (``sgd``/``adam``/``adamw``; ``name`` and
    ``lr`` are required; momentum, nesterov and weight decay absent are torch's defaults)."""
    name = str(given(options, "name", "config optimizer")).lower()
    lr = float(given(options, "lr", "config optimizer"))
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


def _bytes(value: Any, name: str) -> bytes:
    if value is None:
        raise DataError(f"the {name} buffer is NULL")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise DataError(f"the {name} buffer must be bytes, got {type(value).__name__}")
    if len(value) % 4:
        raise DataError(f"the {name} buffer has {len(value):,} bytes, not a whole number of "
                        "4-byte values (truncated?)")
    return value


def buffer_tensors(
    x: bytes,
    y: bytes | None,
    config: dict[str, Any],
    device: torch.device,
    *,
    targets: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode a packed buffer into ``(X, Y)`` tensors on ``device`` (``Y`` None unless
    ``targets``, by default whether ``y`` is given), refusing partial rows, NaN/±inf features
    or regression targets, and class labels outside ``[0, n_outputs)``."""
    order = config.get("byteorder", "<")
    shape = tuple(config["input_shape"])
    width = int(np.prod(shape))
    xs = np.frombuffer(_bytes(x, "x"), dtype=f"{order}f4")
    if xs.size % width:
        raise DataError(f"the x buffer holds {xs.size:,} floats, not a multiple of the {width} "
                        f"features of a row (input_shape {list(shape)}; truncated?)")
    xs = xs.astype("<f4", copy=True)
    if not all_finite(xs):
        raise DataError("the x buffer holds NaN or infinite feature values")
    X = torch.from_numpy(xs.reshape(-1, *shape)).to(device)
    if not (y is not None if targets is None else targets):
        return X, None
    raw = _bytes(y, "y")
    if len(raw) // 4 != X.shape[0]:
        raise DataError(f"the buffer has {X.shape[0]:,} rows of x but {len(raw) // 4:,} targets")
    if config["task"] == "classification":
        labels = np.frombuffer(raw, dtype=f"{order}i4")
        k = int(config["n_outputs"])
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise DataError(f"the y buffer holds class labels in [{int(labels.min())}, "
                            f"{int(labels.max())}], outside [0, {k}) (n_outputs={k})")
        Y = torch.from_numpy(labels.astype(np.int64)).to(device)
    else:
        ys = np.frombuffer(raw, dtype=f"{order}f4").astype("<f4").reshape(-1, 1)
        if not all_finite(ys):
            raise DataError("the y buffer holds NaN or infinite regression targets")
        Y = torch.from_numpy(ys).to(device)
    return X, Y


def plan_for(config: dict[str, Any]) -> NetworkPlan:
    """Check ``config`` and size its network (one row must fit the activation budget)."""
    check_config(config)
    plan = plan_network(config["spec"], config["input_shape"], int(config["n_outputs"]))
    check_budget(plan, 1)
    return plan


def network_for(config: dict[str, Any]) -> nn.Sequential:
    """The (untrained) network described by ``config``, after checking config and size."""
    return plan_for(config).build()


@clean_errors("initial state")
def initial_state(config: dict[str, Any]) -> bytes:
    """A fresh, seeded model as a state (iteration 0)."""
    plan = plan_for(config)
    torch.manual_seed(int(given(config, "seed")))
    net = plan.build()
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    meta = {"kernel_version": KERNEL_VERSION, "device": "cpu"}
    return encode_state(TrainState(tensors, meta=meta))


@clean_errors("warm start")
def warm_start_state(config: dict[str, Any], source: bytes) -> tuple[bytes, list[str]]:
    """A fresh seeded model whose tensors are copied from ``source`` wherever name and shape
    match (a new output head keeps its fresh initialisation). Returns the state and the
    names of the tensors that were copied. Optimizer state starts empty."""
    plan = plan_for(config)
    torch.manual_seed(int(given(config, "seed")))
    net = plan.build()
    fresh = net.state_dict()
    donor = decode_state(source).model_tensors()
    copied = [
        k for k, v in fresh.items()
        if k in donor and donor[k].shape == v.shape and donor[k].dtype == v.dtype
    ]
    tensors = {f"model.{k}": (donor[k] if k in copied else v) for k, v in fresh.items()}
    meta = {"kernel_version": KERNEL_VERSION, "device": "cpu"}
    return encode_state(TrainState(tensors, meta=meta)), copied


_WARM = False


def warm_up() -> float:
    """One optimizer step of each kind on a tiny network, so that torch's lazy imports
    (optimizers, autograd) are paid now rather than in a process's first training round.
    Returns the seconds it took (≈ 0 after the first call in a process)."""
    global _WARM
    started = time.perf_counter()
    if not _WARM:
        net = nn.Linear(2, 2)
        for name in OPTIMIZERS:
            opt = make_optimizer(net.parameters(), {"name": name, "lr": 1e-3})
            opt.zero_grad()
            net(torch.zeros(1, 2)).sum().backward()
            opt.step()
        _WARM = True
    return time.perf_counter() - started


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

    @clean_errors("training")
    def __init__(self, config: dict[str, Any], state: bytes, *, fresh: bool) -> None:
        """Check and decode ``state``; ``fresh`` starts this iteration's counters at zero."""
        self.plan = plan_for(config)
        self.config = config
        set_threads(config.get("threads"))
        self.device, self.device_note = pick_device(given(config, "device"))
        decoded = decode_state(state)
        self.net = self.plan.build()
        check_model_tensors(decoded.model_tensors(), self.net.state_dict())
        self.net.load_state_dict(decoded.model_tensors())
        self.net.to(self.device)
        freeze = config.get("freeze") or []
        check_freeze(freeze, len(self.net))
        self.frozen = [self.net[int(i)] for i in freeze]
        for module in self.frozen:
            module.requires_grad_(False)
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, given(config, "optimizer"))
        saved = decoded.optimizer_tensors()
        check_optimizer_tensors(saved, trainable, self.optimizer_name)
        if saved:
            current = self.optimizer.state_dict()
            current["state"] = saved
            self.optimizer.load_state_dict(current)
        self.loss_fn = make_loss(config["task"])
        self.samples = 0 if fresh else decoded.samples
        self.loss_sum = 0.0 if fresh else decoded.loss_sum
        self.combines = 0 if fresh else decoded.combines
        self.meta = {} if fresh else dict(decoded.meta)

    @property
    def optimizer_name(self) -> str:
        """``sgd``, ``adam`` or ``adamw``."""
        return str(self.config["optimizer"]["name"]).lower()

    @clean_errors("training")
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
        if not isinstance(buffer_id, int) or isinstance(buffer_id, bool):
            raise DataError(f"buffer_id must be an integer, got {buffer_id!r}")
        X, Y = buffer_tensors(x, y, cfg, self.device, targets=True)
        assert Y is not None
        n = X.shape[0]
        batch = int(given(cfg, "batch_size"))
        check_budget(self.plan, max(1, min(batch, n)))
        seed, epoch = int(given(cfg, "seed")), int(cfg.get("epoch", 0))
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, buffer_id))
        )
        seed_dropout(self.device, mix_seed(seed, epoch, buffer_id, 1))
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
        loss_sum = float(total)
        if not math.isfinite(loss_sum):
            lr = cfg["optimizer"]["lr"]
            raise KernelError(
                f"training diverged on buffer {buffer_id} (member {cfg.get('member', 0)}): the "
                f"loss became {loss_sum}; lower the learning rate (lr={lr}) or scale the features"
            )
        self.samples += n
        self.loss_sum += loss_sum
        if progress is not None:
            progress(n)

    @clean_errors("training")
    def to_bytes(self) -> bytes:
        """The current state, ready to be emitted by the aggregate (never NaN/±inf)."""
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        for index, values in self.optimizer.state_dict()["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = value
                elif isinstance(value, (int, float)):
                    tensors[f"optim.{index}.{key}"] = torch.tensor(float(value))
        for name, value in tensors.items():
            if value.is_floating_point() and not all_finite(value):
                raise StateError(f"training diverged: {name} became NaN or infinite; lower "
                                 "the learning rate or scale the features")
        meta = dict(self.meta)
        meta.update(
            kernel_version=KERNEL_VERSION,
            device=self.device.type,
            device_note=self.device_note,
            threads=torch.get_num_threads(),
        )
        return encode_state(TrainState(tensors, self.samples, self.loss_sum, self.combines, meta))
