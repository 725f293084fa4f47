"""IPython magics: ``%dbconnect``, ``%dbinstall``, ``%%dbtrain``, ``%dbmodels``.

Thin by design: parse the line, call :mod:`dbdl_magic.api`, display. Values in the SQL written
as ``:name`` are bound from the notebook's variables, never pasted into the text.
"""

from __future__ import annotations

import re
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import (
    argument,
    argument_group,
    magic_arguments,
    parse_argstring,
)
from sqlalchemy.engine import Engine
from traitlets import Bool, Enum, Float, Int, Unicode
from traitlets.config import Configurable

from dbdl_magic import api
from dbdl_magic.errors import DbdlError, InputError, InstallError
from dbdl_magic.notebook.connections import ConnectionRegistry
from dbdl_magic.notebook.widgets import make_monitor
from dbdl_magic.options import OPTION, flag_arguments, literal, values_from_flags

# Same rule as SQLAlchemy's text(): ``:name`` not preceded by ``:`` or a word character.
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")


def _option_flags(func: Any) -> Any:
    """``@argument`` for every training option that has a flag, in the schema's order
    (:func:`dbdl_magic.options.flag_arguments`)."""
    for flags, kwargs in reversed(flag_arguments()):  # the parser reads decorators bottom-up
        func = argument(*flags, **kwargs)(func)
    return func


def bind_parameters(sql: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Values for every ``:name`` in ``sql`` from ``namespace``; a missing one is an error."""
    names = dict.fromkeys(_BIND.findall(sql))
    missing = [n for n in names if n not in namespace]
    if missing:
        raise InputError(
            f"the query uses parameter(s) {', '.join(':' + n for n in missing)} but no such "
            "variable is defined in the notebook"
        )
    return {n: namespace[n] for n in names}


@magics_class
class DbdlMagic(Magics, Configurable):
    """Train PyTorch models inside the connected database from a notebook."""

    epochs = Int(OPTION["epochs"].default, help="Default number of epochs for %%dbtrain.").tag(
        config=True
    )
    model = Unicode(OPTION["model"].default, help="Default model spec for %%dbtrain.").tag(
        config=True
    )
    refresh = Float(0.5, help="Seconds between live display updates.").tag(config=True)
    display = Enum(
        ["auto", "widgets", "text", "none"],
        "auto",
        help="Live monitor: widgets in Jupyter, text elsewhere.",
    ).tag(config=True)
    short_errors = Bool(True, help="Show dbdl errors as one line (detail on err.detail).").tag(
        config=True
    )

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        Configurable.__init__(self, config=shell.config if shell is not None else None)
        Magics.__init__(self, shell=shell, **kwargs)
        self.connections = ConnectionRegistry()

    # -- connections ----------------------------------------------------------------------------
    @magic_arguments()
    @argument("target", nargs="?", help="SQLAlchemy URL, a variable holding an Engine, or an alias")
    @argument("-a", "--alias", help="name this connection")
    @argument("-l", "--list", action="store_true", help="list connections (passwords hidden)")
    @argument("-x", "--close", metavar="ALIAS", help="close a named connection")
    @line_magic
    def dbconnect(self, line: str) -> Any:
        """Connect to a database: ``%dbconnect postgresql+psycopg://me@host/db --alias shop``."""
        args = parse_argstring(self.dbconnect, line)
        if args.close:
            self.connections.close(args.close)
            return None
        if args.list or not args.target:
            import pandas as pd

            return pd.DataFrame(
                self.connections.rows(), columns=["alias", "url", "backend", "current"]
            )
        target: Any = args.target
        if target in self.connections.databases and not args.alias:
            db = self.connections.use(target)
        else:
            value = self.shell.user_ns.get(target) if target.isidentifier() else None
            if isinstance(value, (Engine, api.Database)):
                target = value
            elif target.isidentifier() and "://" not in target:
                raise InputError(
                    f"{target!r} is neither a connection URL, a known alias, nor a variable "
                    "holding an Engine"
                )
            try:
                db = self.connections.connect(target, alias=args.alias)
            except InstallError as exc:
                db = self.connections.get()
                print(f"dbdl: connected to {db.url} as {self.connections.current!r}, but the "
                      f"kernels are not usable there: {exc}\nRun %dbinstall (as a superuser).")
                return None
        print(f"dbdl: connected to {db.url} ({db.backend.name}) as {self.connections.current!r}")
        return None

    @magic_arguments()
    @argument("target", nargs="?", help="URL or alias (default: the current connection)")
    @line_magic
    def dbinstall(self, line: str) -> None:
        """Install the dbdl kernels into the database (idempotent; superuser on PostgreSQL)."""
        args = parse_argstring(self.dbinstall, line)
        if args.target and args.target not in self.connections.databases:
            db = api.install(args.target)
        else:
            db = api.install(self.connections.get(args.target))
        print(f"dbdl: kernels installed in {db.url}")

    @magic_arguments()
    @argument("name", help="the stored model to score with")
    @argument("--into", help="write key columns + predictions to this table")
    @argument("--proba", action="store_true", help="add one probability column per class")
    @argument("--version", type=int, help="model version (default: latest)")
    @argument("--keys", help="comma-separated key columns to keep (default: non-features)")
    @argument("--replace", action="store_true", help="replace the --into table if it exists")
    @argument("--fallback", help="per-group model: the model (name[:version]) that scores rows "
              "of groups it has no model for")
    @argument("-o", "--out", help="variable for the DataFrame (without --into)")
    @argument("--con", help="connection alias (default: current)")
    @cell_magic
    def dbpredict(self, line: str, cell: str) -> Any:
        """Score the cell's SQL with a stored model inside the database."""
        args = parse_argstring(self.dbpredict, line)
        keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
        result = api.predict(
            self.connections.get(args.con), args.name, cell,
            into=args.into, proba=args.proba, version=args.version, keys=keys,
            params=bind_parameters(cell, self.shell.user_ns), replace=args.replace,
            **({"fallback": args.fallback} if args.fallback else {}),
        )
        if args.into:
            print(f"dbdl: wrote {result} prediction(s) to {args.into}")
            return None
        if args.out:
            self.shell.user_ns[args.out] = result
            return None
        return result

    @magic_arguments()
    @argument("--con", help="connection alias (default: current)")
    @line_magic
    def dbmodels(self, line: str) -> Any:
        """The models stored in the database, as a DataFrame."""
        args = parse_argstring(self.dbmodels, line)
        return api.list_models(self.connections.get(args.con))

    def _grid(self, text: str) -> dict[str, Any]:
        """``--grid``: a variable of the notebook, or a dict literal."""
        if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]  # IPython's argument splitting keeps the quotes
        value = self.shell.user_ns[text] if text in self.shell.user_ns else literal(text, "--grid")
        if not isinstance(value, dict):
            raise InputError(f"--grid {text!r}: must be a dict of option → list of values")
        return value

    # -- training -------------------------------------------------------------------------------
    @magic_arguments()
    @argument("name", nargs="?", help="model name; also the variable the model is bound to")
    @argument("-o", "--out", help="variable to bind the model to (default: NAME)")
    @argument("--con", help="connection alias (default: current)")
    @argument("--display", choices=["auto", "widgets", "text", "none"])
    @argument_group("training options (those of dl.train; default: dl.train's)")
    @_option_flags
    @cell_magic
    def dbtrain(self, line: str, cell: str) -> None:
        """Train on the rows of the cell's SQL, inside the database; binds the model to NAME."""
        args = parse_argstring(self.dbtrain, line)
        options: dict[str, Any] = {"target": args.target, "model": self.model,
                                   "epochs": self.epochs}
        options.update(values_from_flags(args, {
            "grid": self._grid,
            "validation_query": lambda name: self.shell.user_ns.get(name, name),
        }))
        params = bind_parameters(cell, self.shell.user_ns)
        if options.get("validation_query"):
            params.update(bind_parameters(options["validation_query"], self.shell.user_ns))
        db = self.connections.get(args.con)
        if self.connections.current == "default" and args.con is None:
            print(f"dbdl: no %dbconnect; using the embedded database {db.url}")
        target_var = args.out or args.name
        kind = args.display or self.display
        monitor = (
            None
            if kind == "none"
            else make_monitor(kind, refresh=self.refresh, title=args.name or "")
        )
        try:
            model = api.train(
                db,
                cell,
                name=args.name,
                params=params,
                on_interrupt="return",
                callbacks=monitor.callbacks() if monitor else None,
                **options,
            )
        except BaseException as exc:
            if monitor is not None:
                monitor.fail(exc)
            raise
        if monitor is not None:
            monitor.finish(model)
        if target_var:
            self.shell.user_ns[target_var] = model


def _short_traceback(
    shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None
) -> list[str]:
    """Show a dbdl error as one line; the full detail stays on ``err.detail``."""
    hint = " (database detail: sys.last_value.detail)" if getattr(value, "detail", None) else ""
    stb = [f"{etype.__name__}: {value}{hint}"]
    shell._showtraceback(etype, value, stb)
    return stb


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext dbdl_magic`` (idempotent)."""
    from dbdl_magic.notebook import accessor  # noqa: F401 - registers df.dl

    magics = DbdlMagic(shell)
    shell.register_magics(magics)
    shell.configurables = [
        c for c in getattr(shell, "configurables", []) if not isinstance(c, DbdlMagic)
    ] + [magics]
    if magics.short_errors:
        shell.set_custom_exc((DbdlError,), _short_traceback)
