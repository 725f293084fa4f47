"""Named connections for the notebook front (``%dbconnect``): URLs, Engines, the current one."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from dbdl_magic import api
from dbdl_magic.errors import InputError


@dataclass
class ConnectionRegistry:
    """Aliases → :class:`~dbdl_magic.api.Database`; one of them is current."""

    databases: dict[str, api.Database] = field(default_factory=dict)
    current: str | None = None

    def connect(
        self, target: str | Engine | api.Database, alias: str | None = None
    ) -> api.Database:
        """Connect and make it current under ``alias``.

        The kernels are checked; when they are missing the connection is still kept (so that
        ``%dbinstall`` can install them) and the :class:`InstallError` is raised.
        """
        db = api.connect(target, check=False)
        name = alias or _default_alias(db)
        self.databases[name] = db
        self.current = name
        db.info = db.backend.check()
        return db

    def use(self, alias: str) -> api.Database:
        if alias not in self.databases:
            raise InputError(f"no connection named {alias!r}; known: {', '.join(self.databases)}")
        self.current = alias
        return self.databases[alias]

    def get(self, alias: str | None = None) -> api.Database:
        """The named or current connection; the embedded SQLite default when there is none."""
        if alias is not None:
            return self.use(alias) if alias != self.current else self.databases[alias]
        if self.current is None:
            self.connect(api.default_url(), alias="default")
        assert self.current is not None
        return self.databases[self.current]

    def close(self, alias: str) -> None:
        db = self.databases.pop(alias, None)
        if db is None:
            raise InputError(f"no connection named {alias!r}; known: {', '.join(self.databases)}")
        db.engine.dispose()
        if self.current == alias:
            self.current = next(iter(self.databases), None)

    def rows(self) -> list[dict[str, object]]:
        """One row per connection, passwords hidden."""
        return [
            {"alias": a, "url": db.url, "backend": db.backend.name, "current": a == self.current}
            for a, db in self.databases.items()
        ]


def _default_alias(db: api.Database) -> str:
    url = db.engine.url
    return url.database.rsplit("/", 1)[-1] if url.database else url.get_backend_name()
