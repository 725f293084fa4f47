"""Resource limits and config checks of the in-database kernels.

The kernels run inside the database server, reachable by any role allowed to call the SQL
functions, so every value of a config is checked before anything is allocated, and the
network a spec describes is sized (parameters, activation memory) before it is built.

The limits are set by the administrator in the **database server's environment** (read by the
server process; kernels never run SQL, as they run in parallel plans):

``DBDL_MAX_PARAMETERS``
    Largest network, in parameters (weights, biases and normalisation statistics), that a
    kernel builds. Default 200,000,000 (0.8 GB of float32, 2.4 GB with Adam's state).
``DBDL_MAX_ACTIVATION_BYTES``
    Estimated activation memory of one training minibatch (every layer's output and its
    gradient, plus convolution workspaces; see :meth:`NetworkPlan.activation_bytes`), and the
    memory an evaluation or prediction chunk may take. Default 2 GiB.

Both are positive integers (``_`` separators allowed). A malformed value is refused with an
error naming the variable rather than silently replaced by the default.

Torch threads are clamped to the cores this server process may run on, whatever the config
asks for: thread creation beyond what the host allows crashes the server process.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from dbdl_magic.kernel.errors import ConfigError, LimitError

DEFAULT_MAX_PARAMETERS = 200_000_000
DEFAULT_MAX_ACTIVATION_BYTES = 2 * 2**30
#: classification outputs: the evaluate aggregate keeps a k × k float64 confusion matrix
MAX_CLASSES = 4096
#: per-dimension sanity bound of any size (input dims, layer sizes, batch size)
MAX_SIZE = 2**31 - 1
#: most threads a config may ask for (then clamped to the server's cores)
MAX_THREADS = 1024
TASKS = ("classification", "regression")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("sgd", "adam", "adamw")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise LimitError(
            f"{name}={text!r} in the database server's environment must be a positive integer"
        )
    return value


def max_parameters() -> int:
    """``DBDL_MAX_PARAMETERS`` of this server process (default 200M)."""
    return _env_int("DBDL_MAX_PARAMETERS", DEFAULT_MAX_PARAMETERS)


def max_activation_bytes() -> int:
    """``DBDL_MAX_ACTIVATION_BYTES`` of this server process (default 2 GiB)."""
    return _env_int("DBDL_MAX_ACTIVATION_BYTES", DEFAULT_MAX_ACTIVATION_BYTES)


def server_cores() -> int:
    """Cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def clamp_threads(threads: Any) -> int | None:
    """The torch thread count to use for a config's ``threads`` (None: leave torch's)."""
    if threads is None:
        return None
    if not is_int(threads) or not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"config threads={threads!r} must be an integer in [1, {MAX_THREADS}]")
    return min(int(threads), server_cores())


def all_finite(values: torch.Tensor | np.ndarray) -> bool:
    """No NaN or ±inf in ``values`` (numpy's check: ~50× faster than ``torch.isfinite`` on
    the CPU; about 1 ms per 1.6M float32)."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            return bool(torch.isfinite(values).all())
        values = values.detach().numpy()
    return bool(np.isfinite(values).all())


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite ``int``/``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        text = repr(value)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise ConfigError(f"config {key}={text} {rule}")


def _int_in(config: dict[str, Any], key: str, low: int, high: int, default: Any = None) -> None:
    value = config.get(key, default)
    if value is None and default is None and key not in config:
        return
    rule = f"must be an integer in [{low}, {high}]"
    _need(is_int(value) and low <= value <= high, key, value, rule)


def check_task(config: Any) -> None:
    """``task`` and ``n_outputs`` (all the metrics function needs)."""
    if not isinstance(config, dict):
        raise ConfigError(f"the kernel config must be a JSON object, got {type(config).__name__}")
    task = config.get("task")
    _need(task in TASKS, "task", task, f"must be one of {', '.join(TASKS)}")
    n_out = config.get("n_outputs")
    if task == "classification":
        _need(is_int(n_out) and 1 <= n_out <= MAX_CLASSES, "n_outputs", n_out,
              f"must be an integer in [1, {MAX_CLASSES}] (the number of classes)")
    else:
        _need(n_out == 1 and is_int(n_out), "n_outputs", n_out, "must be 1 for regression")


def check_config(config: Any) -> None:
    """Refuse a config whose values are of the wrong type or out of range (the spec itself is
    checked, and sized, by :func:`dbdl_magic.kernel.netbuild.plan_network`)."""
    check_task(config)
    shape = config.get("input_shape")
    _need(
        isinstance(shape, list) and 1 <= len(shape) <= 3
        and all(is_int(s) and 1 <= s <= MAX_SIZE for s in shape),
        "input_shape", shape, "must be a list of 1 to 3 positive integers",
    )
    _need(isinstance(config.get("spec"), dict), "spec", config.get("spec"),
          "must be a JSON object with a 'layers' list")
    _need(config.get("byteorder", "<") in ("<", ">"), "byteorder", config.get("byteorder"),
          "must be '<' or '>'")
    device = config.get("device", "auto")
    _need(isinstance(device, str) and device.lower() in DEVICES, "device", device,
          f"must be one of {', '.join(DEVICES)}")
    _int_in(config, "batch_size", 1, MAX_SIZE, 64)
    _int_in(config, "seed", -(2**63), 2**64 - 1, 0)
    _int_in(config, "epoch", 0, 2**62, 0)
    _int_in(config, "member", -(2**62), 2**62, 0)
    clamp_threads(config.get("threads"))
    scale = config.get("target_scale", [0.0, 1.0])
    _need(isinstance(scale, list) and len(scale) == 2 and all(is_number(v) for v in scale)
          and scale[1] != 0, "target_scale", scale, "must be [mean, std] finite, std ≠ 0")
    every = config.get("progress_every", 0.5)
    _need(is_number(every) and every >= 0, "progress_every", every, "must be a number ≥ 0")
    for key in ("progress", "proba"):
        _need(isinstance(config.get(key, True), bool), key, config.get(key), "must be true/false")
    _need(isinstance(config.get("run", ""), str), "run", config.get("run"), "must be a string")
    freeze = config.get("freeze") or []
    _need(isinstance(freeze, list) and all(is_int(i) and 0 <= i < MAX_SIZE for i in freeze),
          "freeze", freeze, "must be a list of layer indices")
    check_optimizer(config.get("optimizer", {}))


def check_optimizer(options: Any) -> None:
    """The ``optimizer`` object: name, finite positive lr, momentum, betas, weight decay."""
    _need(isinstance(options, dict), "optimizer", options, "must be a JSON object")
    name = options.get("name", "adam")
    _need(isinstance(name, str) and name.lower() in OPTIMIZERS, "optimizer.name", name,
          f"must be one of {', '.join(OPTIMIZERS)}")
    lr = options.get("lr", 1e-3)
    _need(is_number(lr) and lr > 0, "optimizer.lr", lr, "must be a finite number > 0")
    for key in ("momentum", "weight_decay"):
        value = options.get(key, 0.0)
        _need(is_number(value) and value >= 0, f"optimizer.{key}", value,
              "must be a finite number ≥ 0")
    _need(isinstance(options.get("nesterov", False), bool), "optimizer.nesterov",
          options.get("nesterov"), "must be true/false")
    betas = options.get("betas", [0.9, 0.999])
    _need(isinstance(betas, list) and len(betas) == 2
          and all(is_number(b) and 0 <= b < 1 for b in betas),
          "optimizer.betas", betas, "must be two numbers in [0, 1)")


def check_freeze(freeze: list[int], n_layers: int) -> None:
    """Frozen layer indices must name layers of the network."""
    bad = [i for i in freeze if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"config freeze={freeze}: layer(s) {bad} do not exist "
                          f"(the network has {n_layers} layers)")
