-- Marks this database as the sandbox's: `astra-ops sandbox reset` empties only a database that
-- has this table, and only the sandbox's migrations create it, so Astra's real database (whose
-- tables would stop these migrations at the first CREATE TABLE) can never carry it.

CREATE TABLE astra_sandbox_marker (
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO astra_sandbox_marker DEFAULT VALUES;
