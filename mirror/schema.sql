-- Trackstar Mirror: the canonical schema.
--
-- Applied by `mirror migrate` (and by `make up` / `mirror serve` at start). Every statement is
-- idempotent, so applying it again on a live database changes nothing. The per-resource
-- current-state relations (mirror.orders, mirror.inventory_items, ...) and their child relations
-- are declared by the modules in projections/ and created by `mirror migrate` right after this
-- file, so that adding a resource is adding a file; the point-in-time functions
-- (mirror/history.sql) come last.
--
-- This file lives in the package (mirror/schema.sql) so that an installed wheel can migrate;
-- the schema.sql at the top of the repository is a link to it.

CREATE SCHEMA IF NOT EXISTS mirror;

-- The resources the registry (projections/) knows, and the relation holding each one's current
-- state: filled by `mirror migrate`, read by the point-in-time functions to check and route a
-- resource name.
CREATE TABLE IF NOT EXISTS mirror.resources (
    name       text PRIMARY KEY,
    table_name text NOT NULL
);

-- ---------------------------------------------------------------------------------------------
-- The event log: every authentic delivery, exactly once per svix-id, never changed afterwards.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS mirror.events (
    -- Log position: allocated at INSERT time, so a transaction that started earlier may commit a
    -- lower position after a higher one is already visible. Readers order by (txid, position);
    -- see mirror/projector.py for why that never skips a late commit.
    position            bigint GENERATED ALWAYS AS IDENTITY,
    txid                xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id            text NOT NULL,            -- svix-id (webhook-id): the dedup key
    received_at         timestamptz NOT NULL,     -- when the request reached the mirror
    svix_timestamp      timestamptz,              -- the signed attempt time (not the event time)
    origin              text NOT NULL DEFAULT 'webhook'
                        CHECK (origin IN ('webhook', 'backfill', 'reconcile', 'fetch')),
    -- '' when the body names no connection (it is then unusable): the primary key needs a value.
    connection_id       text NOT NULL,
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
    -- connection_id first, like every table holding a connection's data (CONTRACT §10), so a
    -- connection's log can live on the shard that holds the rest of its data.
    CONSTRAINT events_pkey PRIMARY KEY (connection_id, position),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);
-- The log position on its own: the projections refer to an event by it.
CREATE UNIQUE INDEX IF NOT EXISTS events_position ON mirror.events (position);

-- Projection partition (0..127): a stable hash of the connection and object key, so one
-- object's events always land in one partition and partitions can be folded in parallel by any
-- number of workers on any hosts. (Added separately so that `mirror migrate` can re-partition
-- a log made by an older engine.)
ALTER TABLE mirror.events ADD COLUMN IF NOT EXISTS
    part smallint NOT NULL GENERATED ALWAYS AS (
        ((hashtext(coalesce(resource, '') || '/' || coalesce(connection_id, '')
           || '/' || coalesce(object_id, event_id)) & 2147483647) % 128)::smallint
    ) STORED;

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

-- A log made before the primary key led with connection_id (it was the position alone, and a
-- body naming no connection kept NULL there): those rows get '' and the key is rebuilt. The
-- one change ever made to stored rows, by the schema's owner, with the guard lifted for the
-- length of this transaction only; nothing but that NULL is touched.
DO $$
BEGIN
    IF (SELECT array_agg(a.attname::text ORDER BY k.n)
        FROM pg_index i
        CROSS JOIN unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = 'mirror.events'::regclass AND i.indisprimary) = ARRAY['position']
    THEN
        ALTER TABLE mirror.events DISABLE TRIGGER events_no_update_delete;
        UPDATE mirror.events SET connection_id = '' WHERE connection_id IS NULL;
        ALTER TABLE mirror.events ENABLE TRIGGER events_no_update_delete;
        ALTER TABLE mirror.events ALTER COLUMN connection_id SET NOT NULL;
        ALTER TABLE mirror.events DROP CONSTRAINT events_pkey;
        ALTER TABLE mirror.events ADD CONSTRAINT events_pkey PRIMARY KEY (connection_id, position);
    END IF;
END;
$$;

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
-- Projection bookkeeping (mirror/projector.py, mirror/store.py).
-- Key columns are COLLATE "C": ids are opaque, so byte order is the right order, and B-tree
-- inserts then compare with memcmp instead of the locale's collation.
-- ---------------------------------------------------------------------------------------------
-- The engine generation these relations were built by. `mirror migrate` compares it with the
-- code's (mirror/db.py ENGINE): on a change it drops the projections and re-partitions the log,
-- and the workers rebuild everything from mirror.events (the log itself is never touched).
CREATE TABLE IF NOT EXISTS mirror.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per partition (128 of them; see mirror.events.part): the (txid, position) of the
-- last event folded, and which worker holds the partition's lease until when. The checkpoint
-- advances in the same transaction as the rows it produced, with the row locked FOR UPDATE and
-- the owner checked, so a worker whose lease was taken over can never apply a page twice.
CREATE TABLE IF NOT EXISTS mirror.checkpoints (
    part          smallint PRIMARY KEY,
    last_txid     xid8 NOT NULL DEFAULT '0'::xid8,
    last_position bigint NOT NULL DEFAULT 0,
    owner         text,                            -- host:pid:worker holding the lease
    lease_until   timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO mirror.checkpoints (part)
SELECT g FROM generate_series(0, 127) AS g
ON CONFLICT (part) DO NOTHING;

-- Which live worker holds which partition, and how far each partition is folded: the SQL face of
-- `mirror status`'s lease list. owner (host:pid:worker, and host, pid, worker split out) is
-- NULL when nobody holds a live lease on the partition: free, or its holder stopped renewing
-- (lease_until then shows when that lease ran out). checkpoint: the (txid, position) of the
-- last event folded.
CREATE OR REPLACE VIEW mirror.partition_owners AS
SELECT c.part AS partition,
       o.owner,
       (regexp_match(o.owner, '^(.*):([0-9]+):([0-9]+)$'))[1] AS host,
       (regexp_match(o.owner, '^(.*):([0-9]+):([0-9]+)$'))[2]::integer AS pid,
       (regexp_match(o.owner, '^(.*):([0-9]+):([0-9]+)$'))[3]::integer AS worker,
       c.lease_until,
       c.last_txid,
       c.last_position,
       '(' || c.last_txid || ',' || c.last_position || ')' AS checkpoint,
       c.updated_at
FROM mirror.checkpoints c
CROSS JOIN LATERAL (SELECT CASE WHEN c.lease_until > now() THEN c.owner END AS owner) o;

-- "Is this event still waiting to be folded?": the one definition, used by the lag figures,
-- caught_up, reconcile and the tests. Per partition it is an index range scan after the
-- checkpoint.
CREATE OR REPLACE VIEW mirror.unprojected_events AS
SELECT e.*
FROM mirror.checkpoints c
JOIN mirror.events e
  ON e.part = c.part AND (e.txid, e.position) > (c.last_txid, c.last_position);

-- Every object ever seen, one row each (also after deletion): resolves ids to connections
-- without scanning history. known_from: when the first of its events was received;
-- first_received: the earliest instant of any received event (a derived version after it is a
-- missed webhook). Written when an object appears or either value moves earlier.
CREATE TABLE IF NOT EXISTS mirror.objects (
    connection_id  text COLLATE "C" NOT NULL,
    resource       text COLLATE "C" NOT NULL,
    object_id      text COLLATE "C" NOT NULL,
    known_from     timestamptz NOT NULL,
    first_received timestamptz NOT NULL,
    PRIMARY KEY (connection_id, resource, object_id)
);
-- Whether the object's current state is a deletion (set when that changes, not every page):
-- table_as_of finds the deleted objects without an anti-join over all of them.
ALTER TABLE mirror.objects ADD COLUMN IF NOT EXISTS deleted boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS objects_id ON mirror.objects (resource, object_id);
CREATE INDEX IF NOT EXISTS objects_deleted ON mirror.objects (resource) WHERE deleted;

-- Every candidate state of every object (the README's "How time and order work"): the state
-- each event carries (or its deletion) and the state each update reveals, at its own valid time, with the time the mirror
-- learnt it (known_from) and what decides ties at one instant (deleted, derived, sent_at,
-- event_id, and the predecessor the event reveals, prev_hash). An answer "as known at K" is
-- decided among the candidates with known_from <= K alone (mirror.version_at), so no later
-- delivery can change it. `wins` marks the collapsed timeline once every event is counted
-- (mirror.versions); valid_to is set on those rows only.
-- data is NULL when the state is the carrying event's own data: the log holds it already.
CREATE TABLE IF NOT EXISTS mirror.states (
    connection_id text COLLATE "C" NOT NULL,
    resource      text COLLATE "C" NOT NULL,
    object_id     text COLLATE "C" NOT NULL,
    valid_from    timestamptz NOT NULL,
    position      bigint NOT NULL,                 -- log position of the carrying event
    derived       boolean NOT NULL,                -- revealed by previous_attributes
    known_from    timestamptz NOT NULL,            -- received_at of that event
    sent_at       timestamptz NOT NULL,            -- svix-id time, or fetch time for snapshots
    event_id      text COLLATE "C" NOT NULL,
    deleted       boolean NOT NULL,
    state_hash    bytea,                           -- equal states, equal hashes (null = absent)
    prev_hash     bytea,                           -- the predecessor a received update reveals
    data          jsonb,                           -- NULL: mirror.events.data at position
    wins          boolean NOT NULL,
    valid_to      timestamptz,                     -- winners only; NULL while current
    -- winners only: [[dotted path, old value, new value], ...] from the version before
    changes       jsonb,
    PRIMARY KEY (connection_id, resource, object_id, valid_from, position, derived)
) WITH (fillfactor = 90);  -- room for valid_to to be set in place (a HOT update, no index)
-- "What changed between T1 and T2": the winners by time.
CREATE INDEX IF NOT EXISTS states_changed_at ON mirror.states (valid_from)
    WHERE wins AND changes IS NOT NULL;

-- Field-level change feed: one row per changed dotted path between consecutive versions. Kept
-- inside each version's row (one write per version, not one per field) and unfolded here.
CREATE OR REPLACE VIEW mirror.changes AS
SELECT s.resource, s.connection_id, s.object_id AS id, s.valid_from AS changed_at,
       c.value ->> 0 AS path, nullif(c.value -> 1, 'null'::jsonb) AS old_value,
       nullif(c.value -> 2, 'null'::jsonb) AS new_value, s.event_id, s.derived
FROM mirror.states s
CROSS JOIN LATERAL jsonb_array_elements(s.changes) AS c(value)
WHERE s.wins AND s.changes IS NOT NULL;

-- The collapsed timeline of every object: one row per version, valid from valid_from
-- (inclusive) to valid_to (exclusive; NULL = still valid). data IS NULL marks a deletion.
CREATE OR REPLACE VIEW mirror.versions AS
SELECT s.resource, s.connection_id, s.object_id, s.valid_from, s.valid_to,
       CASE WHEN s.deleted THEN NULL ELSE coalesce(s.data, e.data) END AS data,
       s.event_id, e.event_type, s.derived, s.known_from, s.position
FROM mirror.states s
JOIN mirror.events e ON e.position = s.position
WHERE s.wins;

-- What the set of events reveals is wrong: missed_webhook, conflict, inconsistent, clock_skew,
-- unplaceable (previous_attributes that cannot be applied), and reconcile's drift. A re-fold
-- marks the fold's own kinds it no longer finds resolved, never deletes them.
CREATE TABLE IF NOT EXISTS mirror.anomalies (
    connection_id text COLLATE "C" NOT NULL,
    resource      text COLLATE "C" NOT NULL,
    object_id     text COLLATE "C" NOT NULL,
    kind          text COLLATE "C" NOT NULL,
    at            timestamptz NOT NULL,
    event_id      text COLLATE "C" NOT NULL,                   -- the event that revealed it
    paths         text[] NOT NULL DEFAULT '{}',
    detail        jsonb,
    detected_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz,
    resolved_by   text,
    PRIMARY KEY (connection_id, resource, object_id, kind, at, event_id)
);
CREATE INDEX IF NOT EXISTS anomalies_open ON mirror.anomalies (detected_at)
    WHERE resolved_at IS NULL;

-- Objects whose fold raised: skipped until a later event folds them cleanly.
CREATE TABLE IF NOT EXISTS mirror.poison (
    connection_id text COLLATE "C" NOT NULL,
    resource      text COLLATE "C" NOT NULL,
    object_id     text COLLATE "C" NOT NULL,
    reason        text NOT NULL,
    last_position bigint NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (connection_id, resource, object_id)
);

-- ---------------------------------------------------------------------------------------------
-- Backfill from the Trackstar REST API (mirror/trackstar/backfill.py).
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
    name       text PRIMARY KEY,                 -- host:pid:worker (the lease owner's name)
    started_at timestamptz NOT NULL DEFAULT now(),
    beat_at    timestamptz NOT NULL DEFAULT now()
);
