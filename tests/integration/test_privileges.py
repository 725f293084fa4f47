"""A shared PostgreSQL: two ordinary roles, the kernels installed by a superuser.

The privilege matrix sends what a hostile role would try straight to SQL (and through the
API) and checks that every attempt is refused or has no effect on the other role's models,
and that no role gains a privilege. Each test prints its matrix (``pytest -s``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

import dbdl_magic as dl
from dbdl_magic.datasets import digits_frame, load_table
from dbdl_magic.errors import DbdlError

pytestmark = pytest.mark.postgres

TRAIN = dict(target="digit", model="mlp:32", epochs=2, batch_size=32, lr=0.01,
             optimizer="adam", validation=0.2, seed=0)
QUERY = "SELECT * FROM digits WHERE CAST(:secret_token AS text) IS NOT NULL"


@dataclass
class Roles:
    admin: dl.Database
    alice: dl.Database
    bob: dl.Database
    names: dict[str, str]

    def engine(self, who: str) -> Engine:
        return getattr(self, who).engine


@pytest.fixture
def roles(pg_db) -> Iterator[Roles]:
    """Roles alice_N and bob_N (LOGIN, no superuser) in a fresh database with the kernels."""
    load_table(pg_db.engine, "digits", digits_frame())
    suffix = f"{os.getpid()}_{time.monotonic_ns() % 10**9}"
    names = {"alice": f"alice_{suffix}", "bob": f"bob_{suffix}"}
    with pg_db.engine.begin() as conn:
        for role in names.values():
            conn.execute(text(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER'))
            conn.execute(text(f'GRANT SELECT ON digits TO "{role}"'))
    url = pg_db.engine.url
    dbs = {who: dl.connect(url.set(username=role).render_as_string(hide_password=False))
           for who, role in names.items()}
    yield Roles(pg_db, dbs["alice"], dbs["bob"], names)
    for db in dbs.values():
        db.engine.dispose()


def attempt(engine: Engine, sql: str, params: dict | None = None) -> str:
    """Run one statement in its own transaction: ``refused: <reason>`` or the rows/rowcount."""
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params or {})
            if result.returns_rows:
                return f"rows {result.all()!r}"
            return f"rowcount {result.rowcount}"
    except DBAPIError as exc:
        return "refused: " + str(exc.orig).splitlines()[0]


def weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_install_leaves_nothing_writable_by_public(roles: Roles):
    dl.train(roles.alice, QUERY, name="churn", params={"secret_token": "s3cret"}, **TRAIN)
    with roles.admin.engine.connect() as conn:
        schemas = conn.execute(text(
            "SELECT n.nspname, has_schema_privilege(CAST(:bob AS name), n.oid, 'CREATE'),"
            " has_schema_privilege(CAST(:bob AS name), n.oid, 'USAGE'),"
            " coalesce((SELECT bool_or(a.grantee = 0 AND a.privilege_type = 'CREATE')"
            "           FROM aclexplode(n.nspacl) AS a), false)"
            " FROM pg_namespace n WHERE n.nspname LIKE 'dbdl%' ORDER BY 1"
        ), {"bob": roles.names["bob"]}).all()
        public_writes = conn.execute(text(
            "SELECT table_schema || '.' || table_name, privilege_type"
            " FROM information_schema.role_table_grants WHERE grantee = 'PUBLIC'"
            " AND table_schema LIKE 'dbdl%' AND privilege_type <> 'SELECT' ORDER BY 1, 2"
        )).all()
        unpinned = conn.execute(text(
            "SELECT p.oid::regprocedure::text FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'dbdl' AND p.prokind = 'f' AND NOT coalesce("
            "  'search_path=pg_catalog, pg_temp' = ANY(p.proconfig), false)"
        )).scalars().all()
        definers = conn.execute(text(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'dbdl' AND p.prosecdef"
        )).scalars().all()
    print("\nschemas (name, bob CREATE, bob USAGE, PUBLIC CREATE):", schemas)
    print("PUBLIC non-SELECT table grants:", public_writes)
    names = [s[0] for s in schemas]
    assert {"dbdl", "dbdl_store"} <= set(names)
    assert any(n.startswith("dbdl_work_") for n in names)  # alice's work schema
    assert not any(s[1] for s in schemas), "bob may CREATE in a dbdl schema"
    assert not any(s[3] for s in schemas), "PUBLIC may CREATE in a dbdl schema"
    usage = {s[0]: s[2] for s in schemas}
    assert usage["dbdl"] and not usage["dbdl_store"]
    assert not any(usage[n] for n in names if n.startswith("dbdl_work_"))
    # PUBLIC writes only through the per-owner views
    assert {t for t, _ in public_writes} == {
        "dbdl.models", "dbdl.checkpoints", "dbdl.blocks", "dbdl.checkpoint_blocks"
    }
    assert unpinned == []
    # work_schema creates a role's schema; the array casts reach the unchecked casts in
    # dbdl_store after checking that the bytes are exactly an array's image
    assert sorted(definers) == ["float4_array", "float8_array", "int4_array", "work_schema"]


def test_privilege_matrix(roles: Roles):
    alice_role, bob_role = roles.names["alice"], roles.names["bob"]
    model = dl.train(roles.alice, QUERY, name="churn", params={"secret_token": "s3cret"},
                     **TRAIN)
    before = weights(model)
    frame = digits_frame()
    accuracy = float((model.predict(frame) == frame["digit"]).mean())
    bob = roles.bob.engine
    other_hash = b"\x00" * 32
    matrix: dict[str, str] = {
        # read
        "read models": attempt(bob, "SELECT name, options, query FROM dbdl.models"),
        "read checkpoints": attempt(bob, "SELECT name, iteration FROM dbdl.checkpoints"),
        "read blocks": attempt(bob, "SELECT count(*) FROM dbdl.blocks"),
        "read store tables": attempt(bob, "SELECT options FROM dbdl_store.models"),
        "read store blocks": attempt(bob, "SELECT count(*) FROM dbdl_store.blocks"),
        "load_model": _api(lambda: dl.load_model(roles.bob, "churn")),
        "predict with her model": _api(
            lambda: dl.predict(roles.bob, "churn", "SELECT * FROM digits")
        ),
        # modify
        "update status": attempt(bob, "UPDATE dbdl.models SET status = 'failed'"),
        "repoint blocks": attempt(
            bob, "UPDATE dbdl.checkpoint_blocks SET hash = :h", {"h": other_hash}
        ),
        "zero refs": attempt(bob, "UPDATE dbdl.blocks SET refs = 0"),
        "release her blocks": attempt(
            bob, "SELECT dbdl.release_blocks(CAST('churn' AS text), 1, CAST(NULL AS integer))"
        ),
        "materialize hers": attempt(bob, "SELECT dbdl.materialize_checkpoint('churn', 1, 1)"),
        "update store table": attempt(bob, "UPDATE dbdl_store.models SET status = 'x'"),
        # delete
        "delete models": attempt(bob, "DELETE FROM dbdl.models"),
        "delete checkpoints": attempt(bob, "DELETE FROM dbdl.checkpoints"),
        "delete blocks": attempt(bob, "DELETE FROM dbdl.blocks"),
        "delete_model api": _api(lambda: dl.delete_model(roles.bob, "churn")),
        "truncate": attempt(bob, "TRUNCATE dbdl_store.blocks"),
        # work tables
        "her work schema": attempt(bob, "SELECT dbdl.work_schema(:r)", {"r": alice_role}),
        # escalate / hijack
        "overload a kernel": attempt(
            bob,
            "CREATE FUNCTION dbdl.archive_checkpoint(text, integer, smallint, text, integer,"
            " integer, integer, boolean) RETURNS text LANGUAGE sql AS 'SELECT 1::text'",
        ),
        "replace a kernel": attempt(
            bob,
            "CREATE OR REPLACE FUNCTION dbdl.kernel_info() RETURNS text LANGUAGE sql"
            " AS 'SELECT 1::text'",
        ),
        "create in store": attempt(bob, "CREATE TABLE dbdl_store.x (a int)"),
        "create in dbdl": attempt(bob, "CREATE TABLE dbdl.x (a int)"),
        "replace a view": attempt(
            bob, "CREATE OR REPLACE VIEW dbdl.models AS SELECT * FROM dbdl_store.models"
        ),
        "alter a kernel": attempt(bob, "ALTER FUNCTION dbdl.kernel_info() SECURITY DEFINER"),
        "write meta": attempt(bob, "UPDATE dbdl.meta SET value = 'x'"),
    }
    # A trojan in bob's own temp schema: kernels pin search_path, calls are qualified
    matrix["temp-schema trojan"] = attempt(
        bob,
        "CREATE FUNCTION pg_temp.release_blocks(text, integer, integer) RETURNS integer"
        " LANGUAGE sql AS 'SELECT 0'",
    )
    # bob trains the same name: his own version 1, her 'churn' is untouched
    his = dl.train(roles.bob, QUERY, name="churn", params={"secret_token": "x"},
                   **{**TRAIN, "seed": 1, "epochs": 1})
    matrix["same name"] = f"bob got version {his.version}"
    # his model's blocks, repointed at by rows he writes under her name: his rows only
    matrix["insert under her name"] = attempt(
        bob,
        "INSERT INTO dbdl.checkpoint_blocks (name, version, iteration, ord, label, hash)"
        " SELECT 'churn', 1, 2, ord + 1000, label, hash FROM dbdl.checkpoint_blocks",
    )
    # the superuser trains after all of this: bob must not become one
    dl.train(roles.admin, QUERY, name="admin_model", params={"secret_token": "x"},
             **{**TRAIN, "epochs": 1})
    with roles.admin.engine.connect() as conn:
        supers = conn.execute(
            text("SELECT rolname FROM pg_roles WHERE rolsuper AND rolname IN (:a, :b)"),
            {"a": alice_role, "b": bob_role},
        ).scalars().all()
        owners = dict(conn.execute(text(
            "SELECT owner, count(*) FROM dbdl_store.models GROUP BY owner"
        )).all())
    print("\nprivilege matrix (bob against alice):")
    for action, outcome in matrix.items():
        print(f"  {action:24s} {outcome}")
    print("superusers among alice/bob:", supers, "models per owner:", owners)

    refused = {k for k, v in matrix.items() if v.startswith("refused")}
    assert {
        "read store tables", "read store blocks", "update store table", "truncate",
        "her work schema", "overload a kernel", "replace a kernel", "create in store",
        "create in dbdl", "replace a view", "alter a kernel", "write meta",
        "load_model", "predict with her model", "delete_model api",
    } <= refused, matrix
    # statements bob may run see only his own (empty) rows
    for action in ("read models", "read checkpoints"):
        assert matrix[action] == "rows []", (action, matrix[action])
    assert matrix["read blocks"] == "rows [(0,)]"
    for action in ("update status", "repoint blocks", "zero refs", "delete models",
                   "delete checkpoints", "delete blocks"):
        assert matrix[action] == "rowcount 0", (action, matrix[action])
    assert matrix["release her blocks"] == "rows [(0,)]"
    assert matrix["same name"] == "bob got version 1"
    assert supers == []
    assert owners == {alice_role: 1, bob_role: 1, roles.admin.engine.url.username: 1}
    # alice's model is exactly what she trained: same weights from the blocks, same accuracy
    again = dl.load_model(roles.alice, "churn")
    assert again.version == 1
    assert same_weights(weights(again), before)
    assert float((again.predict(frame) == frame["digit"]).mean()) == accuracy
    with roles.alice.engine.begin() as conn:  # the hot copy dropped: rebuilt from her blocks
        conn.execute(text("UPDATE dbdl.checkpoints SET state = NULL"))
    assert same_weights(weights(dl.load_model(roles.alice, "churn")), before)


def _api(call: Callable[[], object]) -> str:
    try:
        out = call()
    except DbdlError as exc:
        return f"refused: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return f"returned {type(out).__name__}"


def test_a_lock_on_the_store_cannot_stall_other_roles(roles: Roles):
    """bob holds an exclusive lock on the model registry; alice's run fails within the lock
    timeout with a clear error instead of waiting, and trains once the lock is gone."""
    alice = dl.connect(roles.alice.engine.url.render_as_string(hide_password=False))
    alice.backend.lock_timeout = "1s"
    bob_conn = roles.bob.engine.connect()
    trans = bob_conn.begin()
    bob_conn.execute(text("LOCK TABLE dbdl.models IN ACCESS EXCLUSIVE MODE"))
    alice.engine.dispose()  # new sessions get the 1 s lock timeout
    started = time.monotonic()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            dl.train(alice, QUERY, name="locked", params={"secret_token": "x"}, **TRAIN)
            outcome["result"] = "trained"
        except DbdlError as exc:
            outcome["result"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=60)
    waited = time.monotonic() - started
    trans.rollback()
    bob_conn.close()
    assert not worker.is_alive(), "alice's run is stalled by bob's lock"
    print(f"\nalice under bob's lock: {outcome['result']!r} after {waited:.1f} s")
    assert isinstance(outcome["result"], DbdlError)
    assert "lock" in str(outcome["result"]).lower()
    model = dl.train(alice, QUERY, name="locked", params={"secret_token": "x"}, **TRAIN)
    assert model.history["val_accuracy"].iloc[-1] > 0.5
    alice.engine.dispose()


def test_models_are_unique_per_owner_and_admins_see_all(roles: Roles):
    a = dl.train(roles.alice, QUERY, name="shared_name", params={"secret_token": "x"}, **TRAIN)
    b = dl.train(roles.bob, QUERY, name="shared_name", params={"secret_token": "x"},
                 **{**TRAIN, "seed": 3})
    assert (a.version, b.version) == (1, 1)
    assert list(dl.list_models(roles.alice)["name"]) == ["shared_name"]
    assert not same_weights(weights(dl.load_model(roles.alice, "shared_name")), weights(b))
    # sharing is role membership: a member of alice's role who SETs ROLE sees her models
    with roles.admin.engine.begin() as conn:
        conn.execute(text(f'GRANT "{roles.names["alice"]}" TO "{roles.names["bob"]}"'))
    engine = create_engine(roles.bob.engine.url)
    with engine.begin() as conn:
        conn.execute(text(f'SET ROLE "{roles.names["alice"]}"'))
        seen = conn.execute(text("SELECT name, version FROM dbdl.models")).all()
    engine.dispose()
    assert seen == [("shared_name", 1)]
