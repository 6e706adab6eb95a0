-- The incident communication ledger (activities/communication.py): one row per message an
-- incident sends to a receiver (chat, status page, pager) for one event. A delivery is claimed
-- here, posted, and marked delivered after the receiver's 2xx, so a retried or concurrent
-- attempt of the same event finds the mark and does not post again.

CREATE TABLE IF NOT EXISTS astra_ops_deliveries (
    incident_id   text        NOT NULL,
    channel       text        NOT NULL,
    event_key     text        NOT NULL,
    claimed_at    timestamptz NOT NULL DEFAULT now(),
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text,
    status_code   integer,
    reference     text,
    delivered_at  timestamptz,
    PRIMARY KEY (incident_id, channel, event_key)
);

-- Which status-page incident shows one of ours: the first delivery creates it, later ones
-- update it, a retry after the create finds it here.
CREATE TABLE IF NOT EXISTS astra_ops_status_page_incidents (
    incident_id               text        NOT NULL,
    page_id                   text        NOT NULL,
    status_page_incident_id   text        NOT NULL,
    created_at                timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (incident_id, page_id)
);
