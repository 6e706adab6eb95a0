-- astra-ops' own bookkeeping beside the Astra tables: which dead-lettered task a repair run
-- (its token) has already requeued, so a retried activity never requeues a task twice.

CREATE TABLE astra_ops_requeues (
    token        text        NOT NULL,
    task_id      text        NOT NULL,
    requeued_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (token, task_id)
);
