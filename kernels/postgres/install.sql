-- dbdl_magic kernels for PostgreSQL (PL/Python). Run by dbdl_magic.install() / `dbdl install URL`
-- as a superuser; idempotent. The server's python3 must be able to import torch, numpy,
-- safetensors and dbdl_magic (start the server with PYTHONPATH pointing at them).
--
-- Rules kept here (see shared/DESIGN.md §4-5): every function that can run in a parallel plan
-- is PARALLEL SAFE and never touches SPI; the training aggregate has a combine function and a
-- bytea state (so it also pushes down on Citus and runs per segment on Greenplum).

CREATE EXTENSION IF NOT EXISTS plpython3u;
CREATE SCHEMA IF NOT EXISTS dbdl;

CREATE TABLE IF NOT EXISTS dbdl.meta (key text PRIMARY KEY, value text NOT NULL);

CREATE OR REPLACE FUNCTION dbdl.kernel_info() RETURNS text
LANGUAGE plpython3u PARALLEL SAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.kernel_info()
$$;

CREATE OR REPLACE FUNCTION dbdl.state_info(state bytea) RETURNS text
LANGUAGE plpython3u IMMUTABLE STRICT PARALLEL SAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.info(state)
$$;

-- Training aggregate: dbdl.train(x, y, buffer_id, model, config) -> new model state.
-- A transition is SGD over a whole buffer: its high COST makes the planner split the work as a
-- partial aggregate per worker instead of gathering rows to one process.
CREATE OR REPLACE FUNCTION dbdl.train_transition(
    state bytea, x bytea, y bytea, buffer_id bigint, model bytea, config text)
RETURNS bytea LANGUAGE plpython3u PARALLEL SAFE COST 1000000 AS $$
from dbdl_magic.kernel import plpython
return plpython.train_transition(GD, state, x, y, buffer_id, model, config, plpy.notice)
$$;

CREATE OR REPLACE FUNCTION dbdl.train_combine(a bytea, b bytea) RETURNS bytea
LANGUAGE plpython3u PARALLEL SAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.train_combine(a, b)
$$;

CREATE OR REPLACE AGGREGATE dbdl.train(bytea, bytea, bigint, bytea, text) (
    SFUNC = dbdl.train_transition,
    STYPE = bytea,
    COMBINEFUNC = dbdl.train_combine,
    PARALLEL = SAFE
);

-- Evaluate aggregate: statistics vector; dbdl.metrics() turns it into JSON.
CREATE OR REPLACE FUNCTION dbdl.eval_transition(
    acc bytea, x bytea, y bytea, model bytea, config text)
RETURNS bytea LANGUAGE plpython3u PARALLEL SAFE COST 100000 AS $$
from dbdl_magic.kernel import plpython
return plpython.eval_transition(GD, acc, x, y, model, config)
$$;

CREATE OR REPLACE FUNCTION dbdl.eval_combine(a bytea, b bytea) RETURNS bytea
LANGUAGE plpython3u PARALLEL SAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.eval_combine(a, b)
$$;

CREATE OR REPLACE AGGREGATE dbdl.evaluate(bytea, bytea, bytea, text) (
    SFUNC = dbdl.eval_transition,
    STYPE = bytea,
    COMBINEFUNC = dbdl.eval_combine,
    PARALLEL = SAFE
);

CREATE OR REPLACE FUNCTION dbdl.metrics(stats bytea, config text) RETURNS text
LANGUAGE plpython3u IMMUTABLE PARALLEL SAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.metrics(stats, config)
$$;

-- Predictions for one packed feature buffer (little-endian float32, n x outputs).
CREATE OR REPLACE FUNCTION dbdl.predict_buffer(x bytea, model bytea, config text)
RETURNS bytea LANGUAGE plpython3u STRICT PARALLEL SAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.predict(GD, x, model, config)
$$;

-- Per-row predictions of one packed feature buffer: (row index, class index, value, probas).
CREATE OR REPLACE FUNCTION dbdl.predict_rows(x bytea, model bytea, config text)
RETURNS TABLE (i integer, label integer, value double precision, proba real[])
LANGUAGE plpython3u STRICT PARALLEL SAFE COST 10000 ROWS 8192 AS $$
from dbdl_magic.kernel import plpython
return plpython.predict_rows(GD, x, model, config)
$$;

-- Row-at-a-time prediction from SQL (reads the stored model once per process; SPI, so
-- PARALLEL UNSAFE):  SELECT id, dbdl.predict('churn', to_jsonb(c)) FROM customers c;
--                    SELECT id, dbdl.predict('churn', age, tenure) FROM customers;  (numeric)
CREATE OR REPLACE FUNCTION dbdl.predict(model text, features jsonb) RETURNS text
LANGUAGE plpython3u STABLE PARALLEL UNSAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.row_predict(plpy, GD, model, features, "label")
$$;

CREATE OR REPLACE FUNCTION dbdl.predict(model text, VARIADIC features double precision[])
RETURNS text LANGUAGE plpython3u STABLE PARALLEL UNSAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.row_predict(plpy, GD, model, features, "label")
$$;

CREATE OR REPLACE FUNCTION dbdl.predict_value(model text, features jsonb)
RETURNS double precision LANGUAGE plpython3u STABLE PARALLEL UNSAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.row_predict(plpy, GD, model, features, "value")
$$;

CREATE OR REPLACE FUNCTION dbdl.predict_proba(model text, features jsonb)
RETURNS double precision[] LANGUAGE plpython3u STABLE PARALLEL UNSAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.row_predict(plpy, GD, model, features, "proba")
$$;

-- Model store (see dbdl_magic/store.py).
CREATE TABLE IF NOT EXISTS dbdl.models (
    name text NOT NULL,
    version integer NOT NULL,
    status text NOT NULL,
    spec text NOT NULL,
    encoding text NOT NULL,
    options text NOT NULL,
    query text NOT NULL,
    history text NOT NULL DEFAULT '[]',
    model_iteration integer,  -- the checkpoint that is the model (NULL: the last one)
    parent text,              -- "name:version" of the model a warm start began from
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

CREATE TABLE IF NOT EXISTS dbdl.checkpoints (
    name text NOT NULL,
    version integer NOT NULL,
    iteration integer NOT NULL,
    state bytea,              -- hot copy (the latest and the model's checkpoint); blocks hold all
    logical_bytes bigint,
    new_bytes bigint,         -- bytes this checkpoint added to the block store
    metrics text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version, iteration),
    FOREIGN KEY (name, version) REFERENCES dbdl.models (name, version) ON DELETE CASCADE
);
ALTER TABLE dbdl.checkpoints ALTER COLUMN state SET STORAGE EXTERNAL;

-- Content-addressed weight blocks (see dbdl_magic/kernel/blockstore.py).
CREATE TABLE IF NOT EXISTS dbdl.blocks (
    hash bytea PRIMARY KEY,     -- BLAKE2b-256 over dtype tag + raw bytes
    dtype text NOT NULL,
    encoding smallint NOT NULL, -- 0 raw, 1 delta (XOR + zstd) against block "base"
    base bytea,
    data bytea NOT NULL,
    raw_size integer NOT NULL,
    refs integer NOT NULL DEFAULT 0
);
ALTER TABLE dbdl.blocks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE IF NOT EXISTS dbdl.checkpoint_blocks (
    name text NOT NULL,
    version integer NOT NULL,
    iteration integer NOT NULL,
    ord integer NOT NULL,
    label text NOT NULL,
    hash bytea NOT NULL,
    PRIMARY KEY (name, version, iteration, ord)
);
CREATE INDEX IF NOT EXISTS checkpoint_blocks_hash ON dbdl.checkpoint_blocks (hash);

-- Storage routines: they use SPI, so they are PARALLEL UNSAFE and only ever called on their own.
CREATE OR REPLACE FUNCTION dbdl.archive_checkpoint(
    name text, version integer, iteration integer, parent_name text, parent_version integer,
    parent_iteration integer, block_bytes integer, deltas boolean)
RETURNS text LANGUAGE plpython3u PARALLEL UNSAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.archive(plpy, GD, name, version, iteration, parent_name, parent_version,
                        parent_iteration, block_bytes, deltas)
$$;

CREATE OR REPLACE FUNCTION dbdl.materialize_checkpoint(
    name text, version integer, iteration integer)
RETURNS void LANGUAGE plpython3u PARALLEL UNSAFE AS $$
from dbdl_magic.kernel import plpython
plpython.materialize(plpy, GD, name, version, iteration)
$$;

CREATE OR REPLACE FUNCTION dbdl.release_blocks(name text, version integer, iteration integer)
RETURNS integer LANGUAGE plpython3u PARALLEL UNSAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.release(plpy, GD, name, version, iteration)
$$;

GRANT USAGE, CREATE ON SCHEMA dbdl TO PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON dbdl.models, dbdl.checkpoints, dbdl.blocks,
    dbdl.checkpoint_blocks TO PUBLIC;
GRANT SELECT ON dbdl.meta TO PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dbdl TO PUBLIC;

-- The installer then records the kernel version in dbdl.meta (a bound value).
