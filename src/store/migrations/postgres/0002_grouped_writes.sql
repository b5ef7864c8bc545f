-- For the grouped writes (many deliveries per statement). Changes are announced once per
-- statement instead of once per row: a statement that changes many deliveries sends one
-- notification per 7,000 bytes of names, each name `tenant/job_id` on a line of its own (a
-- job id holds no control characters). Sent when the write commits, as before.

DROP TRIGGER deliveries_changed ON deliveries;
DROP FUNCTION otp_announce_change();

CREATE FUNCTION otp_announce_changes() RETURNS trigger AS $$
DECLARE
    payload TEXT;
BEGIN
    FOR payload IN
        SELECT string_agg(name, E'\n')
        FROM (
            SELECT name, sum(length(name) + 1) OVER (ORDER BY id) / 7000 AS part
            FROM (
                SELECT n.id, n.tenant || '/' || n.job_id AS name
                FROM changed_new n JOIN changed_old o ON o.id = n.id
                WHERE o.revision IS DISTINCT FROM n.revision
            ) changed
        ) named
        GROUP BY part
    LOOP
        PERFORM pg_notify('otp_delivery_changed', payload);
    END LOOP;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER deliveries_changed
    AFTER UPDATE ON deliveries
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION otp_announce_changes();

-- Room on each page for a row's next versions: a delivery's and a target's rows are rewritten
-- two or three times while it runs, and an update that changes no indexed column stays on
-- the page (a heap-only tuple) without touching the indexes only where the page has room.
ALTER TABLE deliveries SET (fillfactor = 70);
ALTER TABLE targets SET (fillfactor = 70);
