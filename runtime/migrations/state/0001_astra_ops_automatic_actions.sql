-- Every action a runbook took without a person, counted against the access policy's budget per
-- (runbook, step, scope); keyed by the step's token, so a retried claim finds its own row.
-- IF NOT EXISTS: workers before this migration created the table on first use.

CREATE TABLE IF NOT EXISTS astra_ops_automatic_actions (
    token  text        PRIMARY KEY,
    scope  text        NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);

-- The budget check counts one scope's actions in a recent window.
CREATE INDEX IF NOT EXISTS astra_ops_automatic_actions_by_scope
    ON astra_ops_automatic_actions (scope, at);
