-- The retention purge finds old deliveries by when they were made.
CREATE INDEX deliveries_by_created ON deliveries (created_at);
