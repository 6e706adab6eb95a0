-- Which task a run (its step's token) has requeued, so a retried activity never requeues a task
-- twice and the verify step can follow what it requeued. It lives in Astra's database, beside
-- `tasks`, because the requeue records and changes a task in one statement.
-- IF NOT EXISTS: databases migrated by the sandbox before astra-ops owned this table have it.

CREATE TABLE IF NOT EXISTS astra_ops_requeues (
    token        text        NOT NULL,
    task_id      text        NOT NULL,
    requeued_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (token, task_id)
);
