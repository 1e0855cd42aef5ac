-- Trackstar Mirror: the canonical schema.
--
-- Applied by `mirror migrate` (and by `make up` / `mirror serve` at start). Every statement is
-- idempotent, so applying it again on a live database changes nothing. The per-resource
-- current-state relations (mirror.orders, mirror.inventory_items, ...) and their child relations
-- are declared by the modules in projections/ and created by `mirror migrate` right after this
-- file, so that adding a resource is adding a file.

CREATE SCHEMA IF NOT EXISTS mirror;

-- ---------------------------------------------------------------------------------------------
-- The event log: every authentic delivery, exactly once per svix-id, never changed afterwards.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS mirror.events (
    -- Log position: allocated at INSERT time, so a transaction that started earlier may commit a
    -- lower position after a higher one is already visible. Readers order by (txid, position);
    -- see mirror/projector.py for why that never skips a late commit.
    position            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid                xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id            text NOT NULL,            -- svix-id (webhook-id): the dedup key
    received_at         timestamptz NOT NULL,     -- when the request reached the mirror
    svix_timestamp      timestamptz,              -- the signed attempt time (not the event time)
    origin              text NOT NULL DEFAULT 'webhook'
                        CHECK (origin IN ('webhook', 'backfill', 'reconcile', 'fetch')),
    connection_id       text,
    integration_name    text,
    integration_type    text,
    event_type          text,                     -- verbatim, as sent
    kind                text,                     -- normalised: lower case, '-' for '_'
    resource            text,                     -- routed resource, NULL when unknown
    object_id           text,                     -- the object's key within its connection
    data                jsonb,
    previous_attributes jsonb,
    body                bytea NOT NULL,           -- the raw body, credentials redacted
    body_sha256         bytea NOT NULL,           -- sha256 of the body exactly as received
    redacted            boolean NOT NULL DEFAULT false,
    unusable_reason     text,                     -- why it cannot be projected; NULL if it can
    -- Projection partition: a stable hash of the object key, so one object's events always land
    -- in one partition (per-object order) and partitions can be folded in parallel.
    part                smallint NOT NULL GENERATED ALWAYS AS (
                            ((hashtext(coalesce(resource, '') || '/' || coalesce(connection_id, '')
                               || '/' || coalesce(object_id, event_id)) & 2147483647) % 16)::smallint
                        ) STORED,
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

CREATE INDEX IF NOT EXISTS events_part_txid_position ON mirror.events (part, txid, position);
CREATE INDEX IF NOT EXISTS events_object ON mirror.events (resource, connection_id, object_id)
    WHERE resource IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_unusable ON mirror.events (unusable_reason)
    WHERE unusable_reason IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_received_at ON mirror.events (received_at);

-- Append-only, enforced by the database itself.
CREATE OR REPLACE FUNCTION mirror.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'mirror.events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE OR REPLACE TRIGGER events_no_update_delete
    BEFORE UPDATE OR DELETE ON mirror.events
    FOR EACH ROW EXECUTE FUNCTION mirror.refuse_change();

CREATE OR REPLACE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON mirror.events
    FOR EACH STATEMENT EXECUTE FUNCTION mirror.refuse_change();

-- Wake the projectors. Delivered on commit and folded to one per transaction; a lost
-- notification only costs latency because the workers also poll.
CREATE OR REPLACE FUNCTION mirror.notify_append() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mirror_events', '');
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER events_notify
    AFTER INSERT ON mirror.events
    FOR EACH STATEMENT EXECUTE FUNCTION mirror.notify_append();

-- ---------------------------------------------------------------------------------------------
-- Projection bookkeeping.
-- ---------------------------------------------------------------------------------------------
-- One checkpoint per partition: the (txid, position) of the last event folded. It advances in
-- the same transaction as the rows it produced, guarded by its previous value.
CREATE TABLE IF NOT EXISTS mirror.checkpoints (
    part          smallint PRIMARY KEY,
    last_txid     xid8 NOT NULL DEFAULT '0'::xid8,
    last_position bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO mirror.checkpoints (part)
SELECT g FROM generate_series(0, 15) AS g
ON CONFLICT (part) DO NOTHING;

-- Every object ever seen, one row each (also after deletion): resolves ids to connections
-- without scanning history.
CREATE TABLE IF NOT EXISTS mirror.objects (
    resource      text NOT NULL,
    object_id     text NOT NULL,
    connection_id text NOT NULL,
    versions      integer NOT NULL,
    deleted       boolean NOT NULL,
    first_valid   timestamptz,
    last_valid    timestamptz,
    PRIMARY KEY (resource, object_id, connection_id)
);

-- Every version of every object. A version is valid from valid_from (inclusive) to valid_to
-- (exclusive; NULL = still valid). data IS NULL marks a deletion (tombstone). known_from is
-- when the mirror received the event that carries or reveals it.
CREATE TABLE IF NOT EXISTS mirror.versions (
    resource      text NOT NULL,
    connection_id text NOT NULL,
    object_id     text NOT NULL,
    seq           integer NOT NULL,                -- position in the object's history, from 0
    valid_from    timestamptz NOT NULL,
    valid_to      timestamptz,
    data          jsonb,
    event_id      text NOT NULL,
    event_type    text NOT NULL,
    derived       boolean NOT NULL DEFAULT false,  -- revealed by previous_attributes
    known_from    timestamptz NOT NULL,
    position      bigint NOT NULL,                 -- log position of the carrying event
    PRIMARY KEY (resource, object_id, connection_id, seq)
);
CREATE INDEX IF NOT EXISTS versions_as_of
    ON mirror.versions (resource, object_id, connection_id, valid_from DESC, seq DESC);
CREATE INDEX IF NOT EXISTS versions_table_as_of ON mirror.versions (resource, valid_from);

-- Field-level change feed: one row per changed dotted path per version.
CREATE TABLE IF NOT EXISTS mirror.changes (
    resource      text NOT NULL,
    connection_id text NOT NULL,
    id            text NOT NULL,
    seq           integer NOT NULL,                -- the version (mirror.versions.seq) it leads to
    changed_at    timestamptz NOT NULL,
    path          text NOT NULL,
    old_value     jsonb,
    new_value     jsonb,
    event_id      text NOT NULL,
    derived       boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS changes_object ON mirror.changes (resource, id, connection_id, seq);
CREATE INDEX IF NOT EXISTS changes_time ON mirror.changes (changed_at);

-- What the set of events reveals is wrong: missed webhooks, conflicting states.
CREATE TABLE IF NOT EXISTS mirror.anomalies (
    resource      text NOT NULL,
    connection_id text NOT NULL,
    object_id     text NOT NULL,
    kind          text NOT NULL,                   -- 'missed_webhook' | 'conflict'
    at            timestamptz NOT NULL,
    event_id      text NOT NULL,                   -- the event that revealed it
    paths         text[] NOT NULL DEFAULT '{}',
    detail        jsonb,
    detected_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz,
    resolved_by   text,
    PRIMARY KEY (resource, object_id, connection_id, kind, at, event_id)
);

-- Objects whose fold raised: skipped until a later event folds them cleanly.
CREATE TABLE IF NOT EXISTS mirror.poison (
    resource      text NOT NULL,
    connection_id text NOT NULL,
    object_id     text NOT NULL,
    reason        text NOT NULL,
    last_position bigint NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (resource, object_id, connection_id)
);

-- ---------------------------------------------------------------------------------------------
-- Backfill from the Trackstar REST API (mirror/backfill.py).
-- ---------------------------------------------------------------------------------------------
-- One row per walk of a list endpoint: connection, endpoint path and the filters repeated on
-- every page (canonical 'key=value&...' text, '' for none). page_token is the token of the next
-- page to fetch (NULL: the first page, or none left once finished_at is set). It moves in the
-- same transaction as the events of the page it follows, guarded by its previous value, so a
-- crashed backfill resumes after the last committed page and never commits a page twice. The
-- access token is never stored here (nor anywhere else).
CREATE TABLE IF NOT EXISTS mirror.backfill_progress (
    connection_id text NOT NULL,
    endpoint      text NOT NULL,                   -- e.g. /wms/orders, /wms/warehouses/w1/locations
    filters       text NOT NULL DEFAULT '',        -- e.g. updated_date[gte]=2025-01-01T00:00:00Z
    resource      text NOT NULL,
    page_token    text,
    pages         integer NOT NULL DEFAULT 0,      -- pages committed by the current walk
    objects       bigint NOT NULL DEFAULT 0,       -- objects received by the current walk
    appended      bigint NOT NULL DEFAULT 0,       -- of which new to mirror.events
    total_count   bigint,                          -- as the API last reported it
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,                     -- NULL while a walk is under way
    PRIMARY KEY (connection_id, endpoint, filters)
);

-- Truncated deliveries and their completion through data_url (mirror/trackstar/completion.py).
-- One row per stub (unusable_reason 'data truncated'), created by the completion worker from
-- the log. A worker claims due rows with FOR UPDATE SKIP LOCKED and a lease on the database
-- clock, so several service instances never fetch one data_url at once; the completing event
-- (event id 'fetch_' || event_id) is appended in the same transaction that marks the row
-- completed, and the log's unique event_id keeps it to one even if a lease runs out.
CREATE TABLE IF NOT EXISTS mirror.completions (
    connection_id   text NOT NULL,
    event_id        text NOT NULL,                -- the truncated delivery's svix-id
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'completed', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,                         -- host:pid of the worker holding it
    lease_until     timestamptz,
    reason          text,                         -- why it failed, or the last error
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    PRIMARY KEY (connection_id, event_id)
);
CREATE INDEX IF NOT EXISTS completions_due ON mirror.completions (next_attempt_at)
    WHERE state = 'pending';

-- Projection workers' heartbeats, wherever they run (the child of `mirror serve`, or
-- `mirror project` on other machines): /readyz and `mirror status` read them.
CREATE TABLE IF NOT EXISTS mirror.workers (
    name       text PRIMARY KEY,                 -- host:pid:worker
    started_at timestamptz NOT NULL DEFAULT now(),
    beat_at    timestamptz NOT NULL DEFAULT now()
);
