-- Point-in-time reconstruction in SQL (the README's SQL cheat-sheet and "How time and order work").
-- Applied by `mirror migrate` after schema.sql and the registry's relations.

-- 'inbound-shipment', 'Inbound_Shipment' -> 'inbound_shipment'; unknown names raise.
CREATE OR REPLACE FUNCTION mirror.canonical_resource(name text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    wanted text := lower(replace(btrim(canonical_resource.name), '-', '_'));
BEGIN
    IF NOT EXISTS (SELECT 1 FROM mirror.resources r WHERE r.name = wanted) THEN
        RAISE EXCEPTION 'unknown resource %', quote_literal(canonical_resource.name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN wanted;
END;
$$;

-- The connection an object belongs to; NULL if unknown; raises when it is in several. With
-- known_at, only connections in which the object had been received by then count.
DROP FUNCTION IF EXISTS mirror.object_connection(text, text, text);
CREATE OR REPLACE FUNCTION mirror.object_connection(resource text, id text,
                                                    connection_id text DEFAULT NULL,
                                                    known_at timestamptz DEFAULT NULL)
RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
    r text := mirror.canonical_resource(object_connection.resource);
    found text;
    n integer;
BEGIN
    IF object_connection.connection_id IS NOT NULL THEN
        RETURN object_connection.connection_id;
    END IF;
    SELECT min(o.connection_id), count(*) INTO found, n
    FROM mirror.objects o
    WHERE o.resource = r AND o.object_id = object_connection.id
      AND (object_connection.known_at IS NULL OR o.known_from <= object_connection.known_at);
    IF n > 1 THEN
        RAISE EXCEPTION '% % exists in % connections: pass connection_id',
            r, quote_literal(object_connection.id), n
            USING ERRCODE = 'cardinality_violation';
    END IF;
    RETURN found;
END;
$$;

-- The candidate that holds at `at` (as known at known_at):
--  * without known_at, the latest winning state at or before `at`: one index probe;
--  * with known_at, the latest instant at or before `at` among the candidates received by
--    then, decided among those alone: a deletion beats data, received beats derived, a state
--    another one at that instant reveals as its predecessor comes first, then the svix-id time,
--    then the id's text. Exactly what the fold (mirror/fold.py) decides with only those events,
--    so no later delivery can change the answer. Two index probes.
-- A plain SQL function, so the planner inlines it and EXPLAIN shows the real plan.
CREATE OR REPLACE FUNCTION mirror.candidate_at(resource text, connection_id text, id text,
                                               at timestamptz, known_at timestamptz)
RETURNS SETOF mirror.states LANGUAGE sql STABLE AS $$
    SELECT s.* FROM mirror.states s
    WHERE s.connection_id = $2 AND s.resource = $1 AND s.object_id = $3 AND s.known_from <= $5
      AND s.valid_from = (
          SELECT t.valid_from FROM mirror.states t
          WHERE t.connection_id = $2 AND t.resource = $1 AND t.object_id = $3
            AND t.valid_from <= $4 AND t.known_from <= $5
          ORDER BY t.valid_from DESC LIMIT 1)
    ORDER BY s.deleted DESC, s.derived ASC,
             NOT EXISTS (
                 SELECT 1 FROM mirror.states b
                 WHERE b.connection_id = $2 AND b.resource = $1 AND b.object_id = $3
                   AND b.valid_from = s.valid_from AND b.known_from <= $5
                   AND NOT b.derived AND NOT b.deleted
                   AND b.prev_hash = s.state_hash AND b.state_hash <> s.state_hash) DESC,
             s.sent_at DESC, s.event_id DESC
    LIMIT 1
$$;

DROP FUNCTION IF EXISTS mirror.version_at(text, text, text, timestamptz, timestamptz);
CREATE OR REPLACE FUNCTION mirror.version_at(resource text, connection_id text, id text,
                                             at timestamptz, known_at timestamptz DEFAULT NULL)
RETURNS SETOF mirror.states LANGUAGE sql STABLE AS $$
    (SELECT s.* FROM mirror.states s
     WHERE $5 IS NULL AND s.connection_id = $2 AND s.resource = $1 AND s.object_id = $3
       AND s.wins AND s.valid_from <= $4
     ORDER BY s.valid_from DESC
     LIMIT 1)
    UNION ALL
    SELECT * FROM mirror.candidate_at($1, $2, $3, $4, $5) WHERE $5 IS NOT NULL
$$;

-- A connection is merged from its events, each carrying a part of it (projections/
-- connection.py does the same in Python): created date, integration, and one entry per
-- resource whose historical sync completed. Credentials never enter it.
CREATE OR REPLACE FUNCTION mirror.merge_connection(state jsonb, e mirror.events)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    out jsonb := coalesce(state, '{}'::jsonb)
                 || jsonb_build_object('connection_id', e.connection_id);
    syncs jsonb;
BEGIN
    IF e.integration_name IS NOT NULL THEN
        out := out || jsonb_build_object('integration_name', e.integration_name);
    END IF;
    IF e.integration_type IS NOT NULL THEN
        out := out || jsonb_build_object('integration_type', e.integration_type);
    END IF;
    IF replace(lower(btrim(e.event_type)), '_', '-') = 'connection.historical-sync-completed' THEN
        syncs := coalesce(out -> 'historical_syncs', '{}'::jsonb);
        IF jsonb_typeof(e.data -> 'resource') = 'string' THEN
            syncs := syncs || jsonb_build_object(e.data ->> 'resource', e.data - 'resource');
        END IF;
        out := out || jsonb_build_object('historical_syncs', syncs);
    ELSE
        out := out || (e.data - ARRAY['access_token', 'api_key', 'refresh_token']);
    END IF;
    RETURN out;
END;
$$;

-- The merged state of a connection at `at` as known at known_at: its few events folded at
-- query time, in the order the fold uses (instant, then data before deletion, then svix-id
-- time, then id).
CREATE OR REPLACE FUNCTION mirror.merged_as_of(resource text, connection_id text, id text,
                                               at timestamptz, known_at timestamptz)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    state jsonb;
    rec record;
BEGIN
    FOR rec IN
        SELECT s.deleted, e FROM mirror.states s JOIN mirror.events e ON e.position = s.position
        WHERE s.connection_id = merged_as_of.connection_id AND s.resource = merged_as_of.resource
          AND s.object_id = merged_as_of.id AND NOT s.derived AND s.valid_from <= merged_as_of.at
          AND (merged_as_of.known_at IS NULL OR s.known_from <= merged_as_of.known_at)
        ORDER BY s.valid_from, s.deleted, s.sent_at, s.event_id COLLATE "C"
    LOOP
        IF rec.deleted THEN
            state := NULL;
        ELSE
            state := mirror.merge_connection(state, rec.e);
        END IF;
    END LOOP;
    RETURN state;
END;
$$;

-- The data of a stored candidate: its own (derived, merged), or its event's.
CREATE OR REPLACE FUNCTION mirror.state_data(s mirror.states) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN s.deleted THEN NULL
                WHEN s.data IS NOT NULL THEN s.data
                ELSE (SELECT e.data FROM mirror.events e WHERE e.position = s.position) END
$$;

-- The object's state at `at` (valid_from inclusive, valid_to exclusive); NULL before its
-- earliest known state and after its deletion. With known_at, only events received at or
-- before known_at count, with the states they reveal. The cost does not grow with the
-- object's history.
CREATE OR REPLACE FUNCTION mirror.object_as_of(resource text, id text, at timestamptz,
                                               connection_id text DEFAULT NULL,
                                               known_at timestamptz DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    r text := mirror.canonical_resource(object_as_of.resource);
    c text := mirror.object_connection(r, object_as_of.id, object_as_of.connection_id,
                                       object_as_of.known_at);
    result jsonb;
BEGIN
    IF c IS NULL OR object_as_of.at IS NULL THEN
        RETURN NULL;
    END IF;
    IF r = 'connection' THEN
        RETURN mirror.merged_as_of(r, c, object_as_of.id, object_as_of.at, object_as_of.known_at);
    END IF;
    SELECT mirror.state_data(v) INTO result
    FROM mirror.version_at(r, c, object_as_of.id, object_as_of.at, object_as_of.known_at) v;
    RETURN result;
END;
$$;

-- Every version of one object, oldest first; `derived` marks states revealed by
-- previous_attributes; data IS NULL marks a deletion.
CREATE OR REPLACE FUNCTION mirror.object_history(resource text, id text,
                                                 connection_id text DEFAULT NULL)
RETURNS TABLE (valid_from timestamptz, valid_to timestamptz, data jsonb, event_id text,
               event_type text, derived boolean)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r text := mirror.canonical_resource(object_history.resource);
    c text := mirror.object_connection(r, object_history.id, object_history.connection_id);
BEGIN
    RETURN QUERY
    SELECT v.valid_from, v.valid_to, v.data, v.event_id, v.event_type, v.derived
    FROM mirror.versions v
    WHERE v.connection_id = c AND v.resource = r AND v.object_id = object_history.id
    ORDER BY v.valid_from;
END;
$$;

-- Every object of a resource as it stood at `at` (deleted ones left out). Without known_at it
-- reads one version per object, never the versions before it: an object whose current version
-- had begun by `at` comes straight from the current-state relation; only the others (changed
-- since `at`, found by the current relation's valid_from index, or deleted, flagged in
-- mirror.objects) are probed in mirror.states. With known_at each object is decided among
-- the candidates known by then.
CREATE OR REPLACE FUNCTION mirror.table_as_of(resource text, at timestamptz,
                                              known_at timestamptz DEFAULT NULL)
RETURNS TABLE (connection_id text, id text, data jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r text := mirror.canonical_resource(table_as_of.resource);
    current_table text;
BEGIN
    IF table_as_of.known_at IS NULL AND r <> 'connection' THEN
        SELECT t.table_name INTO current_table FROM mirror.resources t WHERE t.name = r;
        -- Names come from mirror.resources (filled from the registry), quoted by format.
        RETURN QUERY EXECUTE format(
            'SELECT c.connection_id, c.id, c.data FROM mirror.%1$I c WHERE c.valid_from <= $1 '
            'UNION ALL '
            'SELECT k.connection_id, k.object_id, mirror.state_data(v) '
            'FROM (SELECT c.connection_id, c.id AS object_id FROM mirror.%1$I c '
            '      WHERE c.valid_from > $1 '
            '      UNION ALL '
            '      SELECT o.connection_id, o.object_id FROM mirror.objects o '
            '      WHERE o.resource = %2$L AND o.deleted) k '
            'CROSS JOIN LATERAL (SELECT s.* FROM mirror.states s '
            '    WHERE s.connection_id = k.connection_id AND s.resource = %2$L '
            '      AND s.object_id = k.object_id AND s.wins AND s.valid_from <= $1 '
            '    ORDER BY s.valid_from DESC LIMIT 1) v '
            'WHERE NOT v.deleted',
            current_table, r)
        USING table_as_of.at;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT o.connection_id, o.object_id, d.data
    FROM mirror.objects o
    CROSS JOIN LATERAL (
        SELECT CASE WHEN r = 'connection'
                    THEN mirror.merged_as_of(r, o.connection_id, o.object_id, table_as_of.at,
                                             table_as_of.known_at)
                    ELSE (SELECT mirror.state_data(v)
                          FROM mirror.candidate_at(r, o.connection_id, o.object_id,
                                                   table_as_of.at, table_as_of.known_at) v)
               END AS data) d
    WHERE o.resource = r AND (table_as_of.known_at IS NULL
                              OR o.known_from <= table_as_of.known_at)
      AND d.data IS NOT NULL;
END;
$$;
