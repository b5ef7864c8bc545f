-- Changes are announced by the statements that make them, not by a trigger. The statement-level
-- trigger of migration 0002 kept every updated row twice in transition tables and joined them
-- to find the changed revisions: about a tenth of the database's time under load. Every
-- statement of the ledger that changes a delivery's revision now ends with
-- `otp_announce(names)` over the rows it changed (the code names them; a lease's renewal changes
-- no revision and announces nothing). The payload is as before: `tenant/job_id` a line each,
-- one notification per 7,000 bytes of names, sent when the write commits.
DROP TRIGGER deliveries_changed ON deliveries;
DROP FUNCTION otp_announce_changes();

CREATE FUNCTION otp_announce(names TEXT[]) RETURNS VOID AS $$
DECLARE
    payload TEXT;
BEGIN
    FOR payload IN
        SELECT string_agg(name, E'\n')
        FROM (
            SELECT name, sum(length(name) + 1) OVER (ORDER BY ord) / 7000 AS part
            FROM unnest(names) WITH ORDINALITY AS n (name, ord)
        ) named
        GROUP BY part
    LOOP
        PERFORM pg_notify('otp_delivery_changed', payload);
    END LOOP;
END;
$$ LANGUAGE plpgsql;
