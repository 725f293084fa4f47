"""The ``dbdl`` command: ``dbdl demo``, ``dbdl install URL``, ``dbdl models [URL]``,
``dbdl report NOTEBOOK``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dbdl_magic.options import flag_arguments, values_from_flags

DATASETS = ("digits", "breast_cancer")


def _demo(args: argparse.Namespace) -> int:
    from dbdl_magic import api
    from dbdl_magic.datasets import breast_cancer_frame, digits_frame, load_table
    from dbdl_magic.notebook.monitor import TextMonitor

    db = api.connect(args.database)
    frame = digits_frame() if args.dataset == "digits" else breast_cancer_frame()
    target = "digit" if args.dataset == "digits" else "diagnosis"
    table = f"demo_{args.dataset}"
    load_table(db.engine, table, frame)
    print(
        f"loaded {len(frame)} rows of scikit-learn's {args.dataset} into table {table!r} "
        f"of {db.url}"
    )
    model = api.train(
        db,
        f"SELECT * FROM {table}",
        target=target,
        name=f"demo_{args.dataset}",
        callbacks=TextMonitor().callbacks(),
        **values_from_flags(args),
    )
    last = model.history.iloc[-1]
    scores = ", ".join(
        f"{label} {last[key]:.4f}"
        for key, label in (("val_accuracy", "held-out accuracy"), ("val_f1", "F1"),
                           ("train_loss", "training loss"))
        if key in last and last[key] == last[key]
    )
    print(f"model {model.name} v{model.version}: {len(model.history)} iterations, {scores}, "
          f"on {model.device}")
    return 0


def _install(args: argparse.Namespace) -> int:
    from dbdl_magic import api
    db = api.install(args.url)
    print(f"dbdl kernels installed in {db.url}; server: {db.info}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from dbdl_magic import api
    print(api.list_models(args.url).to_string(index=False))
    return 0


def _report(args: argparse.Namespace) -> int:
    from dbdl_magic.notebook.reports import (
        NotebookReportError,
        executed_notebook_path,
        render_notebook_report,
    )

    try:
        html = render_notebook_report(
            args.notebook,
            args.output,
            hide_input=args.hide_input,
            timeout=args.timeout,
            cwd=args.cwd,
        )
    except NotebookReportError as exc:
        print(f"dbdl report: {exc}", file=sys.stderr)
        print(f"dbdl report: the error is shown in {exc.html} and {exc.notebook}", file=sys.stderr)
        return 1
    executed = executed_notebook_path(Path(args.notebook), html)
    print(f"dbdl report: wrote {html} (executed notebook: {executed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbdl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on a bundled real data set in the embedded SQLite")
    demo.add_argument("--database", default=None, help="SQLAlchemy URL (default: ./dbdl.db)")
    demo.add_argument("--dataset", choices=DATASETS, default="digits")
    training = demo.add_argument_group("training options (those of dl.train; default: dl.train's)")
    for flags, kwargs in flag_arguments(exclude=("target",)):  # the data set names the target
        training.add_argument(*flags, **kwargs)
    demo.set_defaults(func=_demo)
    install = sub.add_parser("install", help="install the kernels into a database (idempotent)")
    install.add_argument("url")
    install.set_defaults(func=_install)
    models = sub.add_parser("models", help="list stored models")
    models.add_argument("url", nargs="?", default=None)
    models.set_defaults(func=_models)
    report = sub.add_parser("report", help="execute a notebook headless and save it as HTML")
    report.add_argument("notebook", help="the .ipynb to run")
    report.add_argument("-o", "--output", help="HTML file (default: NOTEBOOK.html beside it)")
    report.add_argument("--hide-input", action="store_true", help="show outputs only, no code")
    report.add_argument("--timeout", type=int, default=600, help="seconds per cell (600)")
    report.add_argument("--cwd", help="working directory of the cells (default: the notebook's)")
    report.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dbdl`` console script."""
    args = build_parser().parse_args(argv)
    from dbdl_magic.errors import DbdlError

    try:
        return args.func(args)
    except DbdlError as exc:
        print(f"dbdl: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
