"""Fuzz the SQL kernel functions on a real PostgreSQL whose processes have a memory limit.

Valid states, configs, specs, buffers and statistics are mutated at random (flipped bytes,
truncations, padding, huge sizes, wrong dtypes, NaN/±inf, negative counters, random JSON) and
sent straight to every SQL function of the kernels, each argument cast to its declared type.
The server runs under ``RLIMIT_AS`` with small budgets in its environment, so a kernel that
allocated what it should not fails the test instead of exhausting the machine.

Asserted: no server process crashed (postmaster pid and start time unchanged, no "terminated
by signal" in its log), every error is a SQL error whose primary message is one of the kernels'
own (``dbdl_magic.kernel.…Error: …``), never torch's or numpy's; every success is sane (a
state that decodes with finite tensors, finite predictions, JSON metrics); the connection stays
usable. Seeded (``DBDL_FUZZ_SEED``), bounded in cases and time. Prints the counts.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import struct
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from pgserver import PostgresServer, require_postgres, server_pythonpath
from test_kernel_limits import make_config, make_x, make_y, split, trained_state

import dbdl_magic as dl
from dbdl_magic.kernel import evaluate, state, train

SEED = int(os.environ.get("DBDL_FUZZ_SEED", "20240611"))
CASES = int(os.environ.get("DBDL_FUZZ_CASES", "1000"))
TIME_BUDGET_S = 150.0
MEMORY_LIMIT = 3 * 2**30  # address space of every server process
SERVER_ENV = {"DBDL_MAX_ACTIVATION_BYTES": str(128 * 2**20), "DBDL_MAX_PARAMETERS": "5000000"}
KERNEL_ERROR = re.compile(r"^dbdl_magic\.kernel\.\w+\.(\w+): ")
# the store routines (SPI; not kernels that take states) may answer in Python's own words
RAW_INTERNAL = ("IndexError", "KeyError", "RuntimeError", "TypeError", "AttributeError",
                "ZeroDivisionError", "OverflowError", "AssertionError", "SystemError", "error")
CRASH_LOG = ("terminated by signal", "was terminated", "exited with exit code",
             "server process", "all server processes terminated")

# function -> (SQL with one placeholder per argument, argument kinds)
FUNCTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("SELECT dbdl.train(CAST(%s AS bytea), CAST(%s AS bytea), CAST(%s AS bigint), "
              "CAST(%s AS bytea), CAST(%s AS text))", ("x", "y", "id", "state", "config")),
    "train_transition": ("SELECT dbdl.train_transition(CAST(%s AS bytea), CAST(%s AS bytea), "
                         "CAST(%s AS bytea), CAST(%s AS bigint), CAST(%s AS bytea), "
                         "CAST(%s AS text))", ("state", "x", "y", "id", "state", "config")),
    "train_combine": ("SELECT dbdl.train_combine(CAST(%s AS bytea), CAST(%s AS bytea))",
                      ("state", "state")),
    "evaluate": ("SELECT dbdl.evaluate(CAST(%s AS bytea), CAST(%s AS bytea), "
                 "CAST(%s AS bytea), CAST(%s AS text))", ("x", "y", "state", "config")),
    "eval_transition": ("SELECT dbdl.eval_transition(CAST(%s AS bytea), CAST(%s AS bytea), "
                        "CAST(%s AS bytea), CAST(%s AS bytea), CAST(%s AS text))",
                        ("stats", "x", "y", "state", "config")),
    "eval_combine": ("SELECT dbdl.eval_combine(CAST(%s AS bytea), CAST(%s AS bytea))",
                     ("stats", "stats")),
    "metrics": ("SELECT dbdl.metrics(CAST(%s AS bytea), CAST(%s AS text))",
                ("stats", "config")),
    "predict_buffer": ("SELECT dbdl.predict_buffer(CAST(%s AS bytea), CAST(%s AS bytea), "
                       "CAST(%s AS text))", ("x", "state", "config")),
    "predict_batch": ("SELECT count(*) FROM dbdl.predict_batch(CAST(%s AS bytea), "
                      "CAST(%s AS bytea), CAST(%s AS text))", ("x", "state", "config")),
    "int4_array": ("SELECT cardinality(dbdl.int4_array(CAST(%s AS bytea)))", ("x",)),
    "float8_array": ("SELECT cardinality(dbdl.float8_array(CAST(%s AS bytea)))", ("x",)),
    "state_info": ("SELECT dbdl.state_info(CAST(%s AS bytea))", ("state",)),
    "kernel_info": ("SELECT dbdl.kernel_info()", ()),
    "predict": ("SELECT dbdl.predict(CAST(%s AS text), CAST(%s AS jsonb))", ("name", "json")),
    "predict_array": ("SELECT dbdl.predict(CAST(%s AS text), VARIADIC CAST(%s AS "
                      "double precision[]))", ("name", "floats")),
    "predict_value": ("SELECT dbdl.predict_value(CAST(%s AS text), CAST(%s AS jsonb))",
                      ("name", "json")),
    "predict_proba": ("SELECT dbdl.predict_proba(CAST(%s AS text), CAST(%s AS jsonb))",
                      ("name", "json")),
    "materialize_checkpoint": ("SELECT dbdl.materialize_checkpoint(CAST(%s AS text), "
                               "CAST(%s AS integer), CAST(%s AS integer))",
                               ("name", "int", "int")),
    "release_blocks": ("SELECT dbdl.release_blocks(CAST(%s AS text), CAST(%s AS integer), "
                       "CAST(%s AS integer))", ("name", "int", "int")),
}
STORE = ("predict", "predict_array", "predict_value", "predict_proba", "materialize_checkpoint",
         "release_blocks", "int4_array", "float8_array")
# kernels that take states, configs and buffers get most of the cases
WEIGHTS = {name: (1 if name in STORE or name == "kernel_info" else 6) for name in FUNCTIONS}

HOSTILE_VALUES: list[Any] = [
    None, -1, 0, 1, 2**31 - 1, 2**31, 2**63, 2**64, 10**30, -(2**63), 1e308, -1e308,
    float("nan"), float("inf"), float("-inf"), "", "x", "out", [], [0], [2**31, 2**31],
    {}, {"a": 1}, True, False, [[[]]], -0.5, 0.5, 1.5,
]
DTYPES = ["I32", "F64", "F16", "BF16", "U8", "BOOL", "I64", "F32", "I8", "X"]


# -- the server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of its own, every process under RLIMIT_AS, small kernel budgets."""
    require_postgres()
    server = PostgresServer.start(server_pythonpath(), memory_limit=MEMORY_LIMIT,
                                  extra_env=SERVER_ENV)
    try:
        yield server
    finally:
        server.stop()


# -- valid material --------------------------------------------------------------------------------
class Material:
    """Valid configs, states, buffers and statistics to mutate."""

    def __init__(self) -> None:
        cnn = make_config(spec="cnn:2", input_shape=[1, 6, 6], batch_size=8)
        self.configs = [
            make_config(),
            make_config("regression"),
            make_config(spec="mlp:8,bn", optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}),
            cnn,
        ]
        self.states: list[bytes] = []
        self.buffers: list[tuple[bytes, bytes]] = []
        for config in self.configs:
            width = math.prod(config["input_shape"])
            self.states += [train.initial_state(config), trained_state_for(config)]
            self.buffers.append((make_x(48, width), make_y(48, config["task"])))
        self.stats = [
            evaluate.stats_to_bytes(evaluate.empty_stats(c) + 1) for c in self.configs[:2]
        ]

    def valid(self, rng: random.Random) -> dict[str, Any]:
        """A consistent set of arguments for one config."""
        i = rng.randrange(len(self.configs))
        config = self.configs[i]
        stats = evaluate.empty_stats(config)
        stats[0] = stats[2] = 1.0  # one row, counted once in the confusion matrix / sse
        return {
            "config": dict(config),
            "state": self.states[2 * i + rng.randrange(2)],
            "x": self.buffers[i][0],
            "y": self.buffers[i][1],
            "stats": evaluate.stats_to_bytes(stats),
            "id": rng.randrange(1000),
        }


def trained_state_for(config: dict[str, Any]) -> bytes:
    if config["input_shape"] == [4]:
        return trained_state(config)
    width = math.prod(config["input_shape"])
    trainer = train.Trainer(config, train.initial_state(config), fresh=True)
    trainer.train_buffer(make_x(48, width), make_y(48, config["task"]), 0)
    return trainer.to_bytes()


# -- mutations -------------------------------------------------------------------------------------
def mutate_bytes(rng: random.Random, data: bytes) -> bytes | None:
    choice = rng.randrange(9)
    if choice == 0 or not data:
        return rng.choice([None, b"", os.urandom(rng.randrange(1, 300))])
    buf = bytearray(data)
    if choice == 1:  # flipped bytes
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if choice == 2:  # truncated
        return bytes(buf[: rng.randrange(len(buf))])
    if choice == 3:  # padded
        return bytes(buf) + os.urandom(rng.randint(1, 64))
    if choice == 4:  # NaN/inf/huge written at an aligned offset
        value = rng.choice([float("nan"), float("inf"), -float("inf"), 3.4e38, -1e30])
        at = rng.randrange(max(1, len(buf) // 4)) * 4
        buf[at : at + 4] = struct.pack(rng.choice(["<f", ">f"]), value)
        return bytes(buf)
    if choice == 5:  # int32 labels out of range
        value = rng.choice([-100, -1, 3, 2**31 - 1, -(2**31)])
        at = rng.randrange(max(1, len(buf) // 4)) * 4
        buf[at : at + 4] = struct.pack(rng.choice(["<i", ">i"]), value)
        return bytes(buf)
    if choice == 6:  # a random slice replaced
        at = rng.randrange(len(buf))
        buf[at : at + rng.randint(1, 32)] = os.urandom(rng.randint(1, 32))
        return bytes(buf)
    if choice == 7:  # duplicated (twice the rows, or a state twice)
        return bytes(buf) * 2
    return bytes(buf[: len(buf) - rng.randint(1, 3)])  # not a whole number of values


def mutate_state(rng: random.Random, data: bytes, material: Material) -> bytes | None:
    choice = rng.randrange(7)
    if choice == 0:
        return mutate_bytes(rng, data)
    if choice == 1:  # another model's state
        return rng.choice(material.states)
    head, table, body = split(data)
    names = [n for n in table if n != "__metadata__"]
    name = rng.choice(names)
    if choice == 2:  # relabelled dtype (same bytes)
        table[name]["dtype"] = rng.choice(DTYPES)
    elif choice == 3:  # a shape that lies
        shape = table[name]["shape"]
        table[name]["shape"] = [rng.choice([0, 1, 2**31, 10**12, -1]) for _ in shape] or [7]
    elif choice == 4:  # header fields
        fields = list(state._HEADER.unpack_from(data))
        index = rng.randrange(1, 7)
        fields[index] = {1: rng.choice([0, 2, 65535]), 2: rng.choice([1, 7]),
                         3: rng.choice([-5, 2**62, 2**63 - 1]),
                         4: rng.choice([float("nan"), float("inf"), -1.0]),
                         5: rng.choice([-1, 2**63 - 1]),
                         6: rng.choice([0, 2**32 - 1, 10**6])}[index]
        return state._HEADER.pack(*fields) + data[state._HEADER.size :]
    elif choice == 5:  # hostile tensor table values
        table[name] = rng.choice([
            {"dtype": "F32", "shape": [2**62], "data_offsets": [0, 2**64]},
            {"dtype": "F32", "shape": [], "data_offsets": [-4, 0]}, [], "x", None,
        ])
    else:  # hostile meta
        meta = rng.choice([b"[1]", b'"x"', b"{", b'{"workers": "x"}', b"\xff\xfe",
                           b"[" * 5000 + b"]" * 5000, b'{"a": 1e999}'])
        samples, loss, combines, _, offset = state.read_header(data)
        return state._HEADER.pack(state.MAGIC, 1, 0, samples, loss, combines, len(meta)) + (
            meta + data[offset:]
        )
    raw = json.dumps(table).encode()
    raw += b" " * (-len(raw) % 8)
    return head + struct.pack("<Q", len(raw)) + raw + body


def mutate_config(rng: random.Random, config: dict[str, Any]) -> str | None:
    choice = rng.randrange(8)
    config = json.loads(json.dumps(config))
    if choice == 0:  # not a config at all
        return rng.choice([None, "", "{", "[]", "null", "42", '"x"', "[" * 100000,
                           json.dumps({"a": [1] * 1000}), "NaN"])
    if choice == 1:  # a top-level key
        key = rng.choice([*config, "threads", "freeze", "progress_every", "member", "run"])
        if rng.random() < 0.2:
            config.pop(key, None)
        else:
            config[key] = rng.choice(HOSTILE_VALUES)
    elif choice == 2:  # an optimizer key
        optimizer = config.setdefault("optimizer", {})
        optimizer[rng.choice(["name", "lr", "momentum", "weight_decay", "betas",
                              "nesterov"])] = rng.choice([*HOSTILE_VALUES, "lbfgs", "SGD"])
    elif choice in (3, 4):  # a layer parameter
        layers = config["spec"]["layers"]
        layer = rng.choice(layers)
        key = rng.choice(["out_features", "in_features", "kernel_size", "stride", "padding",
                          "output_size", "p", "eps", "momentum", "bias", "type", "out_channels",
                          "num_features", "normalized_shape", "negative_slope"])
        layer[key] = rng.choice([*HOSTILE_VALUES, "same", "LSTM", "Linear",
                                 [2**30, 2**30]])
    elif choice == 5:  # layers inserted with huge sizes
        layers = config["spec"]["layers"]
        layers.insert(rng.randrange(len(layers) + 1), rng.choice([
            {"type": "AdaptiveAvgPool1d", "output_size": rng.choice([2**31, 2**31 - 1, 2**24])},
            {"type": "AdaptiveAvgPool2d", "output_size": [2**16, 2**16]},
            {"type": "Linear", "out_features": rng.choice([10**9, 2**31 - 1, 10**6])},
            {"type": "Conv2d", "out_channels": 2**20, "kernel_size": 1},
            {"type": "Conv1d", "out_channels": 4, "padding": 2**30},
            {"type": "MaxPool2d", "kernel_size": 2**31},
            {"type": "BatchNorm1d"}, {"type": "Flatten"}, {"type": "Dropout", "p": 2},
        ]))
    elif choice == 6:  # sizes that do not match the data
        config[rng.choice(["input_shape", "n_outputs", "batch_size"])] = rng.choice(
            [[10**6, 10**6], [2**31 - 1], [0], [1, 2, 3, 4], 10**6, 2**31 - 1, 4096, 1, 2]
        )
    else:  # the spec replaced by random JSON
        config["spec"] = rng.choice([{"layers": []}, {"layers": [None]}, [], "mlp:8",
                                     {"layers": [{"type": "Linear"}] * 2000}, {"layers": {}}])
    return json.dumps(config)


def hostile_args(rng: random.Random, kinds: tuple[str, ...], material: Material) -> list[Any]:
    """Valid arguments with 1–3 of them mutated (about one case in ten left valid)."""
    base = material.valid(rng)
    args: list[Any] = []
    for kind in kinds:
        if kind == "config":
            args.append(json.dumps(base["config"]))
        elif kind == "name":
            args.append(rng.choice(["nope", "", "x" * 500, "a:1", "a:b", "'; --", None]))
        elif kind == "json":
            args.append(rng.choice(['{"x1": 1}', "[]", '{"a": "NaN"}', "null", "1e999", '""']))
        elif kind == "floats":
            args.append([rng.choice([0.0, 1e308, -1.0]) for _ in range(rng.randrange(4))])
        elif kind == "int":
            args.append(rng.choice([0, -1, 2**31 - 1, None]))
        else:
            args.append(base[kind])
    mutable = [i for i, k in enumerate(kinds) if k in ("config", "state", "x", "y", "stats", "id")]
    if mutable and rng.random() > 0.1:
        for i in rng.sample(mutable, min(len(mutable), rng.randint(1, 3))):
            kind = kinds[i]
            if kind == "config":
                args[i] = mutate_config(rng, base["config"])
            elif kind == "state":
                args[i] = mutate_state(rng, args[i], material)
            elif kind == "id":
                args[i] = rng.choice([None, -1, 2**63 - 1, -(2**63)])
            else:
                args[i] = mutate_bytes(rng, args[i])
    return args


# -- checking outcomes -----------------------------------------------------------------------------
def check_success(name: str, value: Any) -> str | None:
    """Why a successful answer is garbage, or None."""
    if value is None:
        return None
    if name in ("train", "train_transition", "train_combine"):
        try:
            decoded = state.decode_state(bytes(value))  # well-formed and finite
        except state.StateError as exc:
            return f"a state that does not decode: {exc}"
        return None if decoded.tensors else "a state without tensors"
    if name == "predict_buffer":
        out = np.frombuffer(bytes(value), "<f4")
        return None if np.isfinite(out).all() else "non-finite predictions"
    if name in ("metrics", "state_info"):
        json.loads(value)
    return None


def address_space_limit(pid: int) -> int | None:
    """The soft RLIMIT_AS of process ``pid`` (None: unlimited)."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max address space"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    raise AssertionError("no address-space line in /proc/PID/limits")


def postmaster(conn: Any) -> tuple[int, str]:
    pid_row = conn.execute("SELECT pg_backend_pid(), CAST(pg_postmaster_start_time() AS text)")
    return tuple(pid_row.fetchone())  # type: ignore[return-value]


def test_fuzz_kernel_functions(fuzz_server: PostgresServer,
                               capsys: pytest.CaptureFixture[str]) -> None:
    import psycopg

    db = dl.install(fuzz_server.create_database("dbdl_fuzz"))
    db.engine.dispose()
    material = Material()
    rng = random.Random(SEED)
    names = list(FUNCTIONS)
    weights = [WEIGHTS[n] for n in names]
    conninfo = fuzz_server.conninfo("dbdl_fuzz")

    def connect() -> Any:
        conn = psycopg.connect(conninfo, autocommit=True)
        conn.execute("SET statement_timeout = '30s'")
        return conn

    conn = connect()
    server_pid = fuzz_server._proc.pid if fuzz_server._proc else None
    assert server_pid is not None
    assert address_space_limit(server_pid) == MEMORY_LIMIT
    _, started = postmaster(conn)
    outcomes: Counter[str] = Counter()
    per_function: Counter[str] = Counter()
    bad: list[str] = []
    crashes = 0
    deadline = time.monotonic() + TIME_BUDGET_S
    cases = 0
    while cases < CASES and time.monotonic() < deadline:
        name = rng.choices(names, weights)[0]
        sql, kinds = FUNCTIONS[name]
        args = hostile_args(rng, kinds, material)
        cases += 1
        per_function[name] += 1
        try:
            value = conn.execute(sql, args).fetchone()[0]
        except psycopg.Error as exc:
            if conn.broken or conn.closed:  # the backend died
                crashes += 1
                bad.append(f"{name}: connection lost: {type(exc).__name__}: {exc}")
                conn = connect()
                continue
            primary = (exc.diag.message_primary or str(exc)).splitlines()[0]
            match = KERNEL_ERROR.match(primary)
            if match:
                inner = re.match(r"[\w.]+ failed: (\w+):", primary[match.end():])
                kind = match.group(1) + (f"({inner.group(1)})" if inner else "")
            elif name in STORE and not primary.startswith(RAW_INTERNAL):
                kind = "store:" + primary.split(":")[0][:40]
            else:
                kind = "UNCLEAN"
                bad.append(f"{name}: {primary[:300]}")
            outcomes[kind] += 1
            if conn.execute("SELECT 1").fetchone()[0] != 1:
                bad.append("connection unusable after an error")
            continue
        problem = check_success(name, value)
        outcomes["ok"] += 1
        if problem:
            bad.append(f"{name} accepted hostile input and returned {problem}")
    _, after_started = postmaster(conn)
    conn.close()
    log = fuzz_server.logfile.read_text(errors="replace")
    crash_lines = [line for line in log.splitlines()
                   if any(marker in line for marker in CRASH_LOG)]
    crashes += len(crash_lines)
    errors = sum(v for k, v in outcomes.items() if k != "ok")
    with capsys.disabled():
        print(f"\n[fuzz] seed {SEED}: {cases} cases over {len(per_function)} functions, "
              f"{outcomes['ok']} accepted, {errors} clean errors, {crashes} crashes, "
              f"{len(bad)} problems")
        print("[fuzz] errors by kind: " + ", ".join(
            f"{k} {v}" for k, v in sorted(outcomes.items()) if k != "ok"))
        print("[fuzz] cases by function: " + ", ".join(
            f"{k} {v}" for k, v in sorted(per_function.items())))
    assert cases >= 400, f"only {cases} cases within {TIME_BUDGET_S:.0f} s"
    assert fuzz_server.running and fuzz_server._proc and fuzz_server._proc.pid == server_pid
    assert after_started == started, "the postmaster restarted"
    assert crashes == 0, "\n".join(crash_lines + bad)
    assert not bad, "\n".join(bad[:20])
    assert outcomes["ok"] > 0 and errors > cases // 2

