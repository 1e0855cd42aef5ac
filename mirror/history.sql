-- Point-in-time reconstruction: the SQL interface of CONTRACT §6.
-- Applied by `mirror migrate` after schema.sql and the registry's relations.

-- The resources the registry knows, filled by `mirror migrate`.
CREATE TABLE IF NOT EXISTS mirror.resources (
    name       text PRIMARY KEY,
    table_name text NOT NULL
);

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
      AND (object_connection.known_at IS NULL OR EXISTS (
          SELECT 1 FROM mirror.versions v
          WHERE v.resource = r AND v.object_id = o.object_id
            AND v.connection_id = o.connection_id
            AND v.known_from <= object_connection.known_at));
    IF n > 1 THEN
        RAISE EXCEPTION '% % exists in % connections: pass connection_id',
            r, quote_literal(object_connection.id), n
            USING ERRCODE = 'cardinality_violation';
    END IF;
    RETURN found;
END;
$$;

-- The one version in force at `at` (as known at known_at): a single index probe on
-- versions_as_of, newest first, stopping at the first match. A plain SQL function, so the
-- planner inlines it and EXPLAIN shows the real plan.
CREATE OR REPLACE FUNCTION mirror.version_at(resource text, connection_id text, id text,
                                             at timestamptz, known_at timestamptz DEFAULT NULL)
RETURNS SETOF mirror.versions LANGUAGE sql STABLE AS $$
    SELECT v.*
    FROM mirror.versions v
    WHERE v.resource = $1 AND v.object_id = $3 AND v.connection_id = $2
      AND v.valid_from <= $4
      AND ($5 IS NULL OR v.known_from <= $5)
    ORDER BY v.valid_from DESC, v.seq DESC
    LIMIT 1
$$;

-- The object's state at `at` (valid_from inclusive, valid_to exclusive); NULL before its
-- earliest known state and after its deletion. With known_at, only events received at or
-- before known_at count, with the states they reveal. One index probe: the cost does not grow
-- with the object's history.
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
    SELECT v.data INTO result
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
    WHERE v.resource = r AND v.object_id = object_history.id AND v.connection_id = c
    ORDER BY v.valid_from, v.seq;
END;
$$;

-- Every object of a resource as it stood at `at` (deleted ones left out).
CREATE OR REPLACE FUNCTION mirror.table_as_of(resource text, at timestamptz,
                                              known_at timestamptz DEFAULT NULL)
RETURNS TABLE (connection_id text, id text, data jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r text := mirror.canonical_resource(table_as_of.resource);
BEGIN
    RETURN QUERY
    SELECT s.connection_id, s.object_id, s.data
    FROM (
        SELECT DISTINCT ON (v.object_id, v.connection_id) v.connection_id, v.object_id, v.data
        FROM mirror.versions v
        WHERE v.resource = r AND v.valid_from <= table_as_of.at
          AND (table_as_of.known_at IS NULL OR v.known_from <= table_as_of.known_at)
        ORDER BY v.object_id, v.connection_id, v.valid_from DESC, v.seq DESC
    ) s
    WHERE s.data IS NOT NULL;
END;
$$;
