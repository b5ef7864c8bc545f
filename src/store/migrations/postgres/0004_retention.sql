-- The retention purge finds old deliveries by when they were made (created_at never changes,
-- so updates of a delivery stay heap-only).
CREATE INDEX deliveries_by_created ON deliveries (created_at);
