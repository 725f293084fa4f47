"""The option schema (dbdl_magic/options.py) and everything generated from it: validation, the
flags of %%dbtrain and ``dbdl demo``, resume keys, what a grid may search, the kernel's config,
what packing reads, dl.train's docstring and the README's options table."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from sqlalchemy import create_engine

import dbdl_magic as dl
from dbdl_magic import api, cli, options
from dbdl_magic.data.packing import PackOptions
from dbdl_magic.datasets import digits_frame, load_table
from dbdl_magic.errors import InputError
from dbdl_magic.kernel import train as kernel_train
from dbdl_magic.kernel.errors import ConfigError
from dbdl_magic.notebook.magics import DbdlMagic
from dbdl_magic.options import (
    LOG_SCALE,
    OPTION,
    OPTIONS,
    REQUIRED,
    SEARCHABLE,
    TrainOptions,
    kernel_config,
    pack_values,
    readme_table,
)
from dbdl_magic.store import registry
from dbdl_magic.store.spec import parse_spec
from dbdl_magic.training.selection import trials

README = Path(__file__).resolve().parents[2] / "README.md"


def opts(**kwargs: Any) -> TrainOptions:
    return TrainOptions.from_kwargs(target="y", **kwargs)


# -- defaults and validation ---------------------------------------------------------------------
def test_defaults_are_the_declared_ones():
    built = opts()
    for o in OPTIONS:
        if o.default is not REQUIRED:
            assert getattr(built, o.name) == o.default, o.name
    assert (built.batch_size, built.lr, built.epochs, built.model) == (64, 1e-3, 10, "mlp:64,32")
    assert [o.name for o in OPTIONS if o.default is REQUIRED] == ["target"]
    # the magic's configurable defaults are the schema's
    assert DbdlMagic.epochs.default_value == OPTION["epochs"].default
    assert DbdlMagic.model.default_value == OPTION["model"].default


def test_a_missing_target_names_the_option_and_its_flag():
    for kwargs in ({}, {"target": None}):
        with pytest.raises(InputError, match=r"option target is required \(--target"):
            TrainOptions.from_kwargs(**kwargs)
    with pytest.raises(InputError, match="option target='  '"):
        TrainOptions.from_kwargs(target="  ")


def test_unknown_options_are_named_with_a_suggestion():
    with pytest.raises(InputError, match="'batchsize' \\(did you mean 'batch_size'\\?\\)"):
        opts(batchsize=3)


class _Opaque:
    """A value of no option's type."""


@pytest.mark.parametrize("o", [o for o in OPTIONS if o.type is not Any], ids=lambda o: o.name)
def test_every_typed_option_refuses_a_wrong_type_naming_itself(o):
    kwargs = {"target": "y", o.name: _Opaque()}
    with pytest.raises(InputError) as info:
        TrainOptions.from_kwargs(**kwargs)
    assert str(info.value).startswith(f"option {o.name}=")
    assert "must" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("epochs", 0, "integer ≥ 1"),
        ("lr", float("inf"), "positive number"),
        ("batch_size", -4, "integer ≥ 1"),
        ("optimizer", "rmsprop", "one of sgd, adam, adamw"),
        ("momentum", -0.1, "number ≥ 0"),
        ("weight_decay", -1.0, "number ≥ 0 (or None)"),
        ("validation", 1.0, "[0, 1)"),
        ("task", "clustering", "auto, classification, regression"),
        ("impute", "median", "mean, zero (or None)"),
        ("image_shape", "8xfoo", "positive sizes"),
        ("image_shape", [8, 0], "positive sizes"),
        ("parallel", "some", "'auto' or an integer"),
        ("sync_every", 0.0, "(0, 1]"),
        ("threads", 0, "[1, 1024]"),
        ("group_by", " ", "column"),
        ("search", "bayes", "'grid' or 'random'"),
        ("trials", 0, "≥ 1"),
        ("patience", 0, "≥ 1"),
        ("on_interrupt", "ignore", "'raise' or 'return'"),
        ("block_bytes", 0, "[1, 2**31)"),
        ("features", [], "at least one column"),
    ],
)
def test_rules_name_the_option_and_say_what_is_valid(name, value, rule):
    with pytest.raises(InputError) as info:
        opts(**{name: value})
    assert str(info.value).startswith(f"option {name}={value!r}: must")
    assert rule in str(info.value)


def test_values_take_their_canonical_form():
    built = opts(optimizer="SGD", momentum=np.float32(0.5), nesterov=np.bool_(True),
                 image_shape="8x8", parallel="3", epochs=np.int64(2), features=("a", "b"))
    assert (built.optimizer, built.image_shape, built.parallel, built.features) == (
        "sgd", [8, 8], 3, ["a", "b"])
    assert type(built.momentum) is float and type(built.epochs) is int
    assert built.nesterov is True
    with pytest.raises(InputError, match="option nesterov=True: needs optimizer='sgd'"):
        opts(nesterov=True)


# -- resume keys, grid ---------------------------------------------------------------------------
def test_resume_keys_are_what_shapes_the_data_or_the_updates():
    assert set(TrainOptions.RESUME_KEYS) == {
        "target", "features", "task", "validation", "validation_query", "impute",
        "max_categories", "image_shape", "rows_per_buffer", "seed", "lr", "batch_size",
        "optimizer", "momentum", "nesterov", "weight_decay", "params", "group_by", "sync_every",
        "grid", "search", "trials", "halving", "averaging", "outer_lr", "outer_momentum",
    }
    # what only steers the run (how long, where, what to return) may change on resume
    for name in ("epochs", "device", "db_device", "parallel", "threads", "patience", "resume",
                 "on_interrupt", "monitor", "block_bytes", "deltas"):
        assert name not in TrainOptions.RESUME_KEYS


#: a valid value of every searchable option, and an invalid one
GRID_VALUES = {
    "model": ("linear", "resnet"),
    "lr": (0.01, 0.0),
    "batch_size": (16, 0),
    "optimizer": ("sgd", "lbfgs"),
    "momentum": (0.5, -1.0),
    "weight_decay": (0.01, -0.5),
}


def test_a_grid_may_search_exactly_the_searchable_options():
    assert set(SEARCHABLE) == set(GRID_VALUES)
    assert set(LOG_SCALE) == {"lr", "weight_decay"} <= set(SEARCHABLE)
    for name, (good, _) in GRID_VALUES.items():
        assert trials(opts(grid={name: [good]})) == [{name: good}]
    for name in ("epochs", "target", "seed", "features"):
        with pytest.raises(InputError) as info:
            trials(opts(grid={name: [1]}))
        assert f"cannot search over {name!r}" in str(info.value)
        assert ", ".join(SEARCHABLE) in str(info.value)


@pytest.mark.parametrize("name", sorted(GRID_VALUES))
def test_grid_values_are_checked_by_the_options_own_rules(name):
    good, bad = GRID_VALUES[name]
    with pytest.raises((InputError, dl.SpecError)) as info:
        trials(opts(grid={name: [good, bad]}))
    assert f"grid configuration {name}=" in str(info.value)
    if name != "model":  # the spec parser words its own errors
        with pytest.raises(InputError) as direct:
            opts(**{name: bad})
        assert str(direct.value) in str(info.value)


def test_random_search_draws_log_scale_options_log_uniformly():
    drawn = trials(opts(grid={"lr": (1e-4, 1e-0), "momentum": (0.0, 1.0)}, search="random",
                        trials=60, seed=1))
    lrs = np.array([t["lr"] for t in drawn])
    assert ((lrs >= 1e-4) & (lrs <= 1.0)).all()
    assert 0.25 < np.mean(lrs < 1e-2) < 0.75  # half the decades lie below 1e-2
    assert np.mean([t["momentum"] < 0.5 for t in drawn]) > 0.25


# -- kernel config and packing -------------------------------------------------------------------
def run_values(**extra: Any) -> dict[str, Any]:
    return dict(spec=parse_spec("mlp:8"), input_shape=[4], n_outputs=2, task="classification",
                byteorder="<", target_scale=[0.0, 1.0], run="t", freeze=[], epoch=0, **extra)


def without(config: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != key}


def test_kernel_config_carries_every_kernel_option_explicitly():
    chosen = opts(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                  batch_size=16, seed=3, db_device="cpu")
    config = kernel_config(chosen, **run_values())
    assert config["optimizer"] == {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                                   "weight_decay": 0.01}
    assert (config["batch_size"], config["seed"], config["device"]) == (16, 3, "cpu")
    for o in OPTIONS:
        if o.kernel and getattr(chosen, o.name) is not None:
            *path, key = o.kernel.split(".")
            node = config
            for part in path:
                node = node[part]
            assert node[key] == getattr(chosen, o.name), o.name
    # None leaves the choice to the optimizer (adamw's own weight decay)
    assert "weight_decay" not in kernel_config(opts(optimizer="adamw"), **run_values())["optimizer"]
    with pytest.raises(TypeError, match="byteorder"):
        kernel_config(chosen, **without(run_values(), "byteorder"))
    assert chosen.optimizer_config() == config["optimizer"]


def test_the_kernel_trains_with_kernel_config_and_refuses_a_missing_option():
    config = kernel_config(opts(batch_size=8, seed=2, lr=0.05, db_device="cpu"), **run_values())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("<f4")
    y = (x[:, 0] > 0).astype("<i4")
    trainer = kernel_train.Trainer(config, kernel_train.initial_state(config), fresh=True)
    trainer.train_buffer(x.tobytes(), y.tobytes(), 0)
    assert trainer.samples == 64
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.05
    state = kernel_train.initial_state(config)
    with pytest.raises(ConfigError, match="config seed is missing"):
        kernel_train.initial_state(without(config, "seed"))
    for key in ("device", "optimizer"):
        with pytest.raises(ConfigError, match=f"config {key} is missing"):
            kernel_train.Trainer(without(config, key), state, fresh=True)
    for key in ("name", "lr"):
        broken = {**config, "optimizer": without(config["optimizer"], key)}
        with pytest.raises(ConfigError, match=f"config optimizer {key} is missing"):
            kernel_train.Trainer(broken, state, fresh=True)
    trainer = kernel_train.Trainer(without(config, "batch_size"), state, fresh=True)
    with pytest.raises(ConfigError, match="config batch_size is missing"):
        trainer.train_buffer(x.tobytes(), y.tobytes(), 0)


def test_pack_values_are_what_packing_reads():
    # derived by the run, not options: the model's size and the segments' buffer need
    fields = {f.name for f in dataclasses.fields(PackOptions)} - {"n_parameters", "min_buffers"}
    chosen = opts(batch_size=16, features=["a"], validation=0.1, seed=9, group_by="g")
    values = pack_values(chosen)
    assert set(values) == fields
    built = PackOptions(**values)
    assert (built.batch_size, built.features, built.validation, built.seed, built.group_by) == (
        16, ["a"], 0.1, 9, "g")
    assert pack_values(chosen, [{"batch_size": 8}, {"batch_size": 128}, {}])["batch_size"] == 128


# -- %%dbtrain and dbdl demo ---------------------------------------------------------------------
@pytest.fixture
def shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "dbdl_magic")
    ip.run_line_magic("reload_ext", "dbdl_magic")  # fresh connection registry
    ip.run_line_magic("dbconnect", f"sqlite:///{tmp_path / 'opts.db'}")
    yield ip
    for name in ("m", "space", "vq", "real"):
        ip.user_ns.pop(name, None)


@pytest.fixture
def recorded(monkeypatch):
    """api.train replaced by a recorder: the options the magic passes, built as dl.train does."""
    calls: list[dict[str, Any]] = []

    def record(con, query, *, target, name=None, callbacks=None, **kwargs):
        calls.append({"target": target, **kwargs})
        return TrainOptions.from_kwargs(target=target, **kwargs)

    monkeypatch.setattr(api, "train", record)
    return calls


def test_every_flag_parses_into_the_options_the_api_builds(shell, recorded):
    shell.user_ns["space"] = {"lr": [1e-3, 1e-2]}
    shell.user_ns["vq"] = "SELECT * FROM t WHERE id >= :lo"
    shell.user_ns["lo"] = 7
    line = (
        "m --target digit --model mlp:8 --epochs 3 --lr 0.01 --batch-size 16 --optimizer sgd "
        "--momentum 0.9 --nesterov --weight-decay 0.001 --validation 0.25 --validation-query vq "
        "--task classification --features a,b --impute mean --max-categories 7 "
        "--image-shape 8x8 --rows-per-buffer 128 --seed 5 --device cpu --db-device cpu "
        "--parallel 2 --sync-every 0.5 --averaging mean --outer-lr 0.7 --outer-momentum 0.5 "
        "--threads 2 --group-by g --grid space --search random "
        "--trials 3 --no-halving --patience 2 --monitor val_f1 --min-delta 0.01 "
        "--no-restore-best --resume --init-from base:2 --freeze 0,2 --display none"
    )
    shell.run_cell_magic("dbtrain", line, "SELECT * FROM t WHERE id < :lo")
    api_kwargs = dict(
        target="digit", model="mlp:8", epochs=3, lr=0.01, batch_size=16, optimizer="sgd",
        momentum=0.9, nesterov=True, weight_decay=0.001, validation=0.25,
        validation_query="SELECT * FROM t WHERE id >= :lo", task="classification",
        features=["a", "b"], impute="mean", max_categories=7, image_shape=(8, 8),
        rows_per_buffer=128, seed=5, device="cpu", db_device="cpu", parallel=2, sync_every=0.5,
        averaging="mean", outer_lr=0.7, outer_momentum=0.5, threads=2, group_by="g",
        grid={"lr": [1e-3, 1e-2]}, search="random", trials=3,
        halving=False, patience=2, monitor="val_f1", min_delta=0.01, restore_best=False,
        resume=True, init_from="base:2", freeze="0,2", params={"lo": 7}, on_interrupt="return",
    )
    assert shell.user_ns["m"] == TrainOptions.from_kwargs(**api_kwargs)
    flagged = {o.name for o in OPTIONS if o.flag}
    assert set(recorded[0]) == flagged | {"params", "on_interrupt"}  # the line covers every flag


def test_no_flags_means_the_api_defaults(shell, recorded):
    shell.run_cell_magic("dbtrain", "m --target digit --display none", "SELECT * FROM t")
    assert shell.user_ns["m"] == TrainOptions.from_kwargs(target="digit", on_interrupt="return")
    assert set(recorded[0]) == {"target", "model", "epochs", "params", "on_interrupt"}


def test_flag_errors(shell, recorded):
    with pytest.raises(UsageError):
        shell.run_cell_magic("dbtrain", "m --target d --epochs three", "SELECT 1")
    with pytest.raises(UsageError):
        shell.run_cell_magic("dbtrain", "m --target d --optimizer rmsprop", "SELECT 1")
    with pytest.raises(InputError, match=r"option target is required \(--target"):
        shell.run_cell_magic("dbtrain", "m --display none", "SELECT 1")
    with pytest.raises(InputError, match="option image_shape='8xfoo'"):
        shell.run_cell_magic("dbtrain", "m --target d --image-shape 8xfoo --display none",
                             "SELECT 1")


def test_dbtrain_flags_train_the_model_the_api_would(shell, tmp_path):
    frame = digits_frame().head(400)
    load_table(create_engine(f"sqlite:///{tmp_path / 'opts.db'}"), "digits", frame)
    line = ("real --target digit --model mlp:16 --epochs 2 --lr 0.02 --batch-size 16 "
            "--optimizer sgd --momentum 0.5 --nesterov --validation 0.25 --seed 4 "
            "--features p10,p20,p30,p42 --max-categories 5 --db-device cpu --device cpu "
            "--no-restore-best --display none")
    with capture_output():
        result = shell.run_cell(f"%%dbtrain {line}\nSELECT * FROM digits")
    assert result.success, result.error_in_exec
    model = shell.user_ns["real"]
    assert list(model.history["samples"]) == [300, 300]  # 400 rows, a quarter held out
    assert model.encoding.feature_names() == ["p10", "p20", "p30", "p42"]
    db = dl.connect(f"sqlite:///{tmp_path / 'opts.db'}")
    with db.engine.connect() as conn:
        stored = registry.read_model(conn, db.backend, "real", with_state=False)["options"]
    expected = TrainOptions.from_kwargs(
        target="digit", model="mlp:16", epochs=2, lr=0.02, batch_size=16, optimizer="sgd",
        momentum=0.5, nesterov=True, validation=0.25, seed=4,
        features=["p10", "p20", "p30", "p42"], max_categories=5, db_device="cpu", device="cpu",
        restore_best=False, on_interrupt="return",
    )
    as_stored = json.loads(json.dumps(expected.to_json_dict()))
    assert {k: stored[k] for k in as_stored} == as_stored
    assert model.spec == parse_spec("mlp:16")


def test_demo_flags_are_generated_with_the_api_defaults(tmp_path, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["demo"])
    assert options.values_from_flags(args) == {}  # dl.train's defaults apply: batch_size 64
    args = parser.parse_args(["demo", "--batch-size", "32", "--features", "p1,p2", "--no-halving",
                              "--grid", "{'lr': [0.01]}"])
    assert options.values_from_flags(args) == {
        "batch_size": 32, "features": ["p1", "p2"], "halving": False, "grid": {"lr": [0.01]}}
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--target", "x"])  # the data set names the target
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    assert cli.main(["demo", "--database", url, "--epochs", "1", "--model", "linear"]) == 0
    assert "model demo_digits v1: 1 iterations, held-out accuracy" in capsys.readouterr().out
    db = dl.connect(url)
    with db.engine.connect() as conn:
        stored = registry.read_model(conn, db.backend, "demo_digits", with_state=False)["options"]
    assert (stored["batch_size"], stored["lr"], stored["validation"]) == (64, 1e-3, 0.2)


def test_flags_follow_the_option_names():
    for flags, kwargs in options.flag_arguments():
        o = OPTION[kwargs["dest"]]
        stem = o.name.replace("_", "-")
        assert flags == ((f"--no-{stem}",) if o.default is True else (f"--{stem}",)), flags
        if o.base is bool:
            assert kwargs["const"] is (not o.default)


# -- documentation -------------------------------------------------------------------------------
def test_readme_table_is_generated_from_the_schema():
    text = README.read_text(encoding="utf-8")
    begin, end = text.index(options.README_BEGIN), text.index(options.README_END)
    in_readme = text[begin + len(options.README_BEGIN):end].strip()
    assert in_readme == readme_table(), (
        "README's options table drifted from dbdl_magic/options.py; run "
        "python -m dbdl_magic.options --update-readme README.md"
    )
    for o in OPTIONS:
        assert f"| `{o.name}` |" in in_readme


def test_readme_table_command_prints_and_updates(tmp_path, capsys):
    assert options.main(["--readme-table"]) == 0
    assert capsys.readouterr().out.strip() == readme_table()
    page = tmp_path / "README.md"
    begin, end = options.README_BEGIN, options.README_END
    page.write_text(f"# x\n{begin}\n| stale |\n{end}\nmore\n", encoding="utf-8")
    assert options.update_readme(page) is True
    assert page.read_text(encoding="utf-8") == f"# x\n{begin}\n{readme_table()}\n{end}\nmore\n"
    assert options.update_readme(page) is False


def test_train_docstring_lists_every_option():
    doc = inspect.getdoc(api.train)
    assert options.docstring_options() in doc, (
        "dl.train's docstring drifted from dbdl_magic/options.py; paste the output of "
        "python -m dbdl_magic.options --docstring"
    )
    for o in OPTIONS:
        assert f"``{o.name}" in doc
