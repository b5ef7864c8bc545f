-- The fraud guard's counts. Each phone attempt keeps its number's range (the country calling
-- code and the next digits, never the number), so that a later verification is counted for the
-- range its code went to. destination_counts: per tenant, range and hour (micros of its start),
-- the sends a provider accepted and the conversions (codes the user entered). Replicas add
-- their counts once a second, each in one statement.
ALTER TABLE attempts ADD COLUMN dest_range TEXT;
CREATE TABLE destination_counts (
    tenant      TEXT   NOT NULL,
    dest_range  TEXT   NOT NULL,
    bucket      BIGINT NOT NULL,
    sends       BIGINT NOT NULL DEFAULT 0,
    conversions BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, dest_range, bucket)
);
