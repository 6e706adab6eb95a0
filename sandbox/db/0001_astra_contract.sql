-- The Astra platform contract (DESIGN.md): the tables the runbooks read and repair.
-- Indexes serve the runbooks' queries: leased tasks of one worker, outcomes in a recent window,
-- LLM cost in a recent window and over the trailing day.

CREATE TABLE workers (
    id          text        PRIMARY KEY,
    pool        text        NOT NULL DEFAULT 'astra-worker',
    started_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tasks (
    id           text        PRIMARY KEY,
    goal_id      text        NOT NULL,
    shard        integer     NOT NULL DEFAULT 0 CHECK (shard >= 0),
    status       text        NOT NULL DEFAULT 'pending'
        CONSTRAINT tasks_status_check
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'dead_letter')),
    -- No foreign key: Astra deletes a worker row when its pod goes, and its tasks must survive
    -- that so the worker-lost runbook can still find and requeue them.
    worker_id    text,
    retries      integer     NOT NULL DEFAULT 0 CHECK (retries >= 0),
    max_retries  integer     NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- worker-lost: "which tasks does this worker hold"; partial, so it stays as small as the work
-- in flight however many finished tasks the table keeps.
CREATE INDEX tasks_running_by_worker ON tasks (worker_id) WHERE status = 'running';
-- high-error-rate: outcomes whose last change falls in the window.
CREATE INDEX tasks_by_updated_at ON tasks (updated_at, status);
-- The scheduler's (and the load generator's) lease query: oldest work first.
CREATE INDEX tasks_waiting ON tasks (updated_at) WHERE status IN ('pending', 'failed');

CREATE TABLE llm_usage (
    id        bigint         GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts        timestamptz    NOT NULL DEFAULT now(),
    agent_id  text           NOT NULL,
    tenant    text           NOT NULL,
    model     text           NOT NULL,
    tokens    integer        NOT NULL CHECK (tokens >= 0),
    cost_usd  numeric(14, 6) NOT NULL CHECK (cost_usd >= 0)
);

-- llm-cost-spike: the last window and the trailing day are both ranges on ts.
CREATE INDEX llm_usage_by_ts ON llm_usage (ts);
