-- A delivery's end changes its status. With an index on the status (or a partial index whose
-- predicate reads it) every end was a new row version with a new entry in each of the
-- delivery's indexes; without them the end is a heap-only update on the same page, like the
-- other writes of a delivery in progress. A page now keeps half its room for those: a
-- delivery's row gets one more version at its end while the versions before it may still be
-- visible to a running statement, and a version that finds no room on its page is not
-- heap-only.
--
-- Listing a tenant's deliveries (with or without a status) walks the tenant's newest first on
-- (tenant, id). Leases are renewed by the keys of the deliveries a replica holds, so the owner
-- needs no index.
DROP INDEX deliveries_by_status;
DROP INDEX deliveries_by_owner;
CREATE INDEX deliveries_by_tenant ON deliveries (tenant, id);
ALTER TABLE deliveries SET (fillfactor = 50);
