-- dbdl_magic kernels for PostgreSQL (PL/Python). Run by dbdl_magic.install() / `dbdl install URL`
-- as a superuser; idempotent (also upgrades an install of kernel version 1). The server's python3
-- must be able to import torch, numpy, safetensors, zstandard and dbdl_magic (start the server
-- with PYTHONPATH pointing at them).
--
-- Rules kept here: every function that can run in a parallel plan is PARALLEL SAFE and never
-- touches SPI; the training aggregate has a combine function and a bytea state (so it also
-- pushes down on Citus and runs per segment on Greenplum).
--
-- Privileges (the database is shared): nothing here is writable by PUBLIC.
--  * schema dbdl: USAGE only. Every function pins search_path = pg_catalog, pg_temp, and the
--    client casts every argument to the declared type, so no other role can slip an overload or
--    an operator in front of a kernel.
--  * the model store lives in schema dbdl_store, which only its owner (the installer) can reach.
--    Roles see it through the views dbdl.models / checkpoints / blocks / checkpoint_blocks, which
--    show and accept only rows owned by current_user (security_barrier + CHECK OPTION): names
--    are unique per owner, and weight blocks are deduplicated within one owner's models (never
--    across owners, which would leak what another role stores). Admins read dbdl_store directly;
--    a role shares its models by granting itself (GRANT alice TO carol; carol: SET ROLE alice).
--  * work tables (staged rows, packed buffers) live in a schema per role that only that role
--    can use, created on first use by dbdl.work_schema().

CREATE EXTENSION IF NOT EXISTS plpython3u;
CREATE SCHEMA IF NOT EXISTS dbdl;
CREATE SCHEMA IF NOT EXISTS dbdl_store;
REVOKE ALL ON SCHEMA dbdl, dbdl_store FROM PUBLIC;

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

-- Segments (sessions of one run, each training over its share of the buffers) hand their
-- partial states to dbdl.merge: the same combine function, as an aggregate over the partials
-- (ORDER BY segment in the call keeps the sum's order, hence the model, reproducible).
CREATE OR REPLACE AGGREGATE dbdl.merge(bytea) (
    SFUNC = dbdl.train_combine,
    STYPE = bytea,
    COMBINEFUNC = dbdl.train_combine,
    PARALLEL = SAFE
);

-- A segment's session pays torch's lazy imports when it opens, not in its first round.
CREATE OR REPLACE FUNCTION dbdl.warm_up() RETURNS text
LANGUAGE plpython3u PARALLEL SAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.warm_up()
$$;

-- The outer optimizer's step over one sync round (averaging = 'outer'): the averaged change
-- is a pseudo-gradient for Nesterov momentum kept in the state (dbdl_magic.kernel.averaging).
CREATE OR REPLACE FUNCTION dbdl.outer_step(start bytea, averaged bytea, config text)
RETURNS bytea LANGUAGE plpython3u STRICT PARALLEL SAFE AS $$
from dbdl_magic.kernel import plpython
return plpython.outer_step(GD, start, averaged, config)
$$;

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

-- Predictions of a whole buffer of rows, one call per buffer: (rows, class indices, values,
-- probabilities), each output the image of an array (see dbdl.int4_array below) or NULL. x is
-- the image of a double precision[] of raw feature values (dbdl.array_image) when the config
-- names its columns, else a packed float32 buffer. SQL unnests the arrays into the target table.
CREATE OR REPLACE FUNCTION dbdl.predict_batch(x bytea, model bytea, config text,
    OUT n integer, OUT labels bytea, OUT vals bytea, OUT proba bytea)
LANGUAGE plpython3u STRICT PARALLEL SAFE COST 100000 AS $$
from dbdl_magic.kernel import plpython
return plpython.predict_batch(GD, x, model, config)
$$;
DROP FUNCTION IF EXISTS dbdl.predict_rows(bytea, bytea, text);

-- Arrays into and out of the kernels without a Python object per value. PL/Python converts
-- every element of an array argument or result on its own (~1 us each, a float through its
-- text form), which cost more than scoring the rows; bytea crosses as one copy. An array's
-- bytes ("image": header, NULL bitmap, native-order values) are read with the server's own
-- varchar() length coercion, which returns its argument unchanged for typmod -1 (and for any
-- other arguments a prefix of it): any value is a valid bytea, so dbdl.array_image is safe
-- for every input. The way back is not (bytes that are not an array would be read as one), so
-- those functions sit in dbdl_store, which no role but the installer can reach, behind checks
-- (SECURITY DEFINER, to reach them) that accept exactly the image of a one-dimensional array
-- without NULLs: the header the server itself writes for an array of that many elements, and
-- the matching length.
CREATE OR REPLACE FUNCTION dbdl.array_image(
    x double precision[], typmod integer DEFAULT -1, explicit boolean DEFAULT false)
RETURNS bytea LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'varchar';
CREATE OR REPLACE FUNCTION dbdl_store.array_bytes(anyarray, integer, boolean) RETURNS bytea
LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'varchar';
CREATE OR REPLACE FUNCTION dbdl_store.bytes_int4s(bytea, integer, boolean) RETURNS integer[]
LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'varchar';
CREATE OR REPLACE FUNCTION dbdl_store.bytes_float4s(bytea, integer, boolean) RETURNS real[]
LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'varchar';
CREATE OR REPLACE FUNCTION dbdl_store.bytes_float8s(bytea, integer, boolean)
RETURNS double precision[] LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'varchar';
REVOKE ALL ON FUNCTION dbdl_store.array_bytes(anyarray, integer, boolean),
    dbdl_store.bytes_int4s(bytea, integer, boolean),
    dbdl_store.bytes_float4s(bytea, integer, boolean),
    dbdl_store.bytes_float8s(bytea, integer, boolean) FROM PUBLIC;

-- Whether image is exactly the image of a one-dimensional array without NULLs of the type of
-- "sample" (an empty array of it) whose elements take width bytes.
CREATE OR REPLACE FUNCTION dbdl_store.is_image(image bytea, sample anyarray, width integer)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    n integer := (length(image) - 20) / width;
BEGIN
    RETURN n >= 1 AND length(image) = 20 + width * n
        AND substr(image, 1, 20) = substr(dbdl_store.array_bytes(
            array_fill(sample[1], ARRAY[n]), -1, false), 1, 20);
END
$$;
REVOKE ALL ON FUNCTION dbdl_store.is_image(bytea, anyarray, integer) FROM PUBLIC;

CREATE OR REPLACE FUNCTION dbdl.int4_array(image bytea) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SECURITY DEFINER AS $$
BEGIN
    IF dbdl_store.is_image(image, CAST(ARRAY[0] AS integer[]), 4) THEN
        RETURN dbdl_store.bytes_int4s(image, -1, false);
    ELSIF image = dbdl_store.array_bytes(CAST('{}' AS integer[]), -1, false) THEN
        RETURN CAST('{}' AS integer[]);
    END IF;
    RAISE EXCEPTION 'dbdl.int4_array: % bytes are not the image of an integer[]', length(image);
END
$$;

CREATE OR REPLACE FUNCTION dbdl.float4_array(image bytea) RETURNS real[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SECURITY DEFINER AS $$
BEGIN
    IF dbdl_store.is_image(image, CAST(ARRAY[0] AS real[]), 4) THEN
        RETURN dbdl_store.bytes_float4s(image, -1, false);
    ELSIF image = dbdl_store.array_bytes(CAST('{}' AS real[]), -1, false) THEN
        RETURN CAST('{}' AS real[]);
    END IF;
    RAISE EXCEPTION 'dbdl.float4_array: % bytes are not the image of a real[]', length(image);
END
$$;

CREATE OR REPLACE FUNCTION dbdl.float8_array(image bytea) RETURNS double precision[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SECURITY DEFINER AS $$
BEGIN
    IF dbdl_store.is_image(image, CAST(ARRAY[0] AS double precision[]), 8) THEN
        RETURN dbdl_store.bytes_float8s(image, -1, false);
    ELSIF image = dbdl_store.array_bytes(CAST('{}' AS double precision[]), -1, false) THEN
        RETURN CAST('{}' AS double precision[]);
    END IF;
    RAISE EXCEPTION 'dbdl.float8_array: % bytes are not the image of a double precision[]',
        length(image);
END
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

-- Model store: tables in dbdl_store (no PUBLIC access), one owner column each.
-- An install of kernel version 1 kept the tables in schema dbdl: move them, owned by the
-- installer (who is the only role that could tell whose they were).
DO $migrate$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['checkpoint_blocks', 'blocks', 'checkpoints', 'models'] LOOP
        IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = 'dbdl' AND c.relname = t AND c.relkind = 'r') THEN
            EXECUTE format('ALTER TABLE dbdl.%I SET SCHEMA dbdl_store', t);
            EXECUTE format('ALTER TABLE dbdl_store.%I ADD COLUMN IF NOT EXISTS owner text'
                           ' NOT NULL DEFAULT CAST(current_user AS text)', t);
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'checkpoints_name_version_fkey'
               AND conrelid = to_regclass('dbdl_store.checkpoints')) THEN
        ALTER TABLE dbdl_store.checkpoints DROP CONSTRAINT checkpoints_name_version_fkey;
        ALTER TABLE dbdl_store.checkpoints DROP CONSTRAINT checkpoints_pkey;
        ALTER TABLE dbdl_store.models DROP CONSTRAINT models_pkey;
        ALTER TABLE dbdl_store.models ADD PRIMARY KEY (owner, name, version);
        ALTER TABLE dbdl_store.checkpoints ADD PRIMARY KEY (owner, name, version, iteration);
        ALTER TABLE dbdl_store.checkpoints ADD FOREIGN KEY (owner, name, version)
            REFERENCES dbdl_store.models (owner, name, version) ON DELETE CASCADE;
        ALTER TABLE dbdl_store.blocks DROP CONSTRAINT blocks_pkey;
        ALTER TABLE dbdl_store.blocks ADD PRIMARY KEY (owner, hash);
        ALTER TABLE dbdl_store.checkpoint_blocks DROP CONSTRAINT checkpoint_blocks_pkey;
        ALTER TABLE dbdl_store.checkpoint_blocks ADD PRIMARY KEY
            (owner, name, version, iteration, ord);
        DROP INDEX IF EXISTS dbdl_store.checkpoint_blocks_hash;
    END IF;
END
$migrate$;

CREATE TABLE IF NOT EXISTS dbdl_store.models (
    owner text NOT NULL DEFAULT CAST(current_user AS text),
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
    PRIMARY KEY (owner, name, version)
);

CREATE TABLE IF NOT EXISTS dbdl_store.checkpoints (
    owner text NOT NULL DEFAULT CAST(current_user AS text),
    name text NOT NULL,
    version integer NOT NULL,
    iteration integer NOT NULL,
    state bytea,              -- hot copy (the latest and the model's checkpoint); blocks hold all
    logical_bytes bigint,
    new_bytes bigint,         -- bytes this checkpoint added to the block store
    metrics text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, name, version, iteration),
    FOREIGN KEY (owner, name, version) REFERENCES dbdl_store.models (owner, name, version)
        ON DELETE CASCADE
);
ALTER TABLE dbdl_store.checkpoints ALTER COLUMN state SET STORAGE EXTERNAL;

-- Content-addressed weight blocks (see dbdl_magic/kernel/blockstore.py).
CREATE TABLE IF NOT EXISTS dbdl_store.blocks (
    owner text NOT NULL DEFAULT CAST(current_user AS text),
    hash bytea NOT NULL,        -- BLAKE2b-256 over dtype tag + raw bytes
    dtype text NOT NULL,
    encoding smallint NOT NULL, -- 0 raw, 1 delta (XOR + zstd) against block "base"
    base bytea,
    data bytea NOT NULL,
    raw_size integer NOT NULL,
    refs integer NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, hash)
);
ALTER TABLE dbdl_store.blocks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE IF NOT EXISTS dbdl_store.checkpoint_blocks (
    owner text NOT NULL DEFAULT CAST(current_user AS text),
    name text NOT NULL,
    version integer NOT NULL,
    iteration integer NOT NULL,
    ord integer NOT NULL,
    label text NOT NULL,
    hash bytea NOT NULL,
    PRIMARY KEY (owner, name, version, iteration, ord)
);
CREATE INDEX IF NOT EXISTS checkpoint_blocks_owner_hash
    ON dbdl_store.checkpoint_blocks (owner, hash);

-- What every role sees and writes: its own rows only.
CREATE OR REPLACE VIEW dbdl.models WITH (security_barrier) AS
    SELECT name, version, status, spec, encoding, options, query, history, model_iteration,
           parent, error, created_at, updated_at
    FROM dbdl_store.models WHERE owner = CAST(current_user AS text)
    WITH LOCAL CHECK OPTION;
CREATE OR REPLACE VIEW dbdl.checkpoints WITH (security_barrier) AS
    SELECT name, version, iteration, state, logical_bytes, new_bytes, metrics, created_at
    FROM dbdl_store.checkpoints WHERE owner = CAST(current_user AS text)
    WITH LOCAL CHECK OPTION;
CREATE OR REPLACE VIEW dbdl.blocks WITH (security_barrier) AS
    SELECT hash, dtype, encoding, base, data, raw_size, refs
    FROM dbdl_store.blocks WHERE owner = CAST(current_user AS text)
    WITH LOCAL CHECK OPTION;
CREATE OR REPLACE VIEW dbdl.checkpoint_blocks WITH (security_barrier) AS
    SELECT name, version, iteration, ord, label, hash
    FROM dbdl_store.checkpoint_blocks WHERE owner = CAST(current_user AS text)
    WITH LOCAL CHECK OPTION;

-- Work tables: one schema per role, owned by it, reachable by no one else. SECURITY DEFINER
-- (creating a schema for a role needs the installer's rights), so it checks that the session
-- may act as that role, and refuses a schema of that name that someone else already owns. Two
-- sessions of a role that ask at once both get the schema one of them created.
CREATE OR REPLACE FUNCTION dbdl.work_schema(role_name text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    schema_name text := 'dbdl_work_' || substr(md5(role_name), 1, 16);
    owner_name text;
BEGIN
    IF NOT pg_has_role(session_user, role_name, 'MEMBER') THEN
        RAISE EXCEPTION 'dbdl.work_schema: % cannot act as role %', session_user, role_name;
    END IF;
    SELECT r.rolname INTO owner_name FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
        WHERE n.nspname = schema_name;
    IF owner_name IS NULL THEN
        BEGIN
            EXECUTE format('CREATE SCHEMA %I AUTHORIZATION %I', schema_name, role_name);
            EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', schema_name);
            EXECUTE format('COMMENT ON SCHEMA %I IS %L', schema_name,
                           'dbdl_magic work tables of role ' || role_name);
        EXCEPTION WHEN unique_violation OR duplicate_schema THEN
            -- another session of the role created it meanwhile (this one waited for that
            -- transaction to commit): check whose it is, as for one that existed before
            SELECT r.rolname INTO owner_name FROM pg_namespace n
                JOIN pg_roles r ON r.oid = n.nspowner WHERE n.nspname = schema_name;
        END;
    END IF;
    IF owner_name IS NOT NULL AND owner_name <> role_name THEN
        RAISE EXCEPTION 'dbdl.work_schema: schema % exists but belongs to %, not %',
            schema_name, owner_name, role_name;
    END IF;
    RETURN schema_name;
END
$$;

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

-- Kernel version 1 let every role CREATE in schema dbdl: drop what non-superusers put there
-- (an overload there could run as whoever calls it).
DO $sweep$
DECLARE
    o record;
BEGIN
    FOR o IN SELECT p.oid::regprocedure AS f, p.prokind FROM pg_proc p
             JOIN pg_namespace n ON n.oid = p.pronamespace
             JOIN pg_roles r ON r.oid = p.proowner
             WHERE n.nspname = 'dbdl' AND NOT r.rolsuper LOOP
        RAISE WARNING 'dbdl install: dropping % (created in schema dbdl by a non-superuser)', o.f;
        EXECUTE format('DROP %s %s CASCADE',
                       CASE o.prokind WHEN 'a' THEN 'AGGREGATE' WHEN 'p' THEN 'PROCEDURE'
                       ELSE 'FUNCTION' END, o.f);
    END LOOP;
    FOR o IN SELECT c.oid::regclass AS t FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_roles r ON r.oid = c.relowner
             WHERE n.nspname = 'dbdl' AND NOT r.rolsuper AND c.relkind IN ('r', 'p')
    LOOP
        RAISE WARNING 'dbdl install: dropping % (created in schema dbdl by a non-superuser)', o.t;
        EXECUTE format('DROP TABLE IF EXISTS %s CASCADE', o.t);
    END LOOP;
END
$sweep$;

-- Every function (also the installer's own in dbdl_store) resolves names in pg_catalog only
-- (its SQL is schema-qualified).
DO $pin$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname IN ('dbdl', 'dbdl_store') AND p.prokind = 'f' LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$pin$;

GRANT USAGE ON SCHEMA dbdl TO PUBLIC;
REVOKE ALL ON dbdl.models, dbdl.checkpoints, dbdl.blocks, dbdl.checkpoint_blocks, dbdl.meta,
    dbdl_store.models, dbdl_store.checkpoints, dbdl_store.blocks, dbdl_store.checkpoint_blocks
    FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON dbdl.models, dbdl.checkpoints, dbdl.blocks,
    dbdl.checkpoint_blocks TO PUBLIC;
GRANT SELECT ON dbdl.meta TO PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dbdl FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dbdl TO PUBLIC;

-- The installer then records the kernel version in dbdl.meta (a bound value).
