-- The fraud guard. destination_recent: the same counts as destination_counts in 10-second
-- buckets (micros of their start), kept for the last hour only: the guard judges the last
-- minutes from them, and the usual volume from the hourly ones. quarantines: one row per tenant
-- and range the guard or an operator held; `until` NULL is a pin (held until lifted); a lifted
-- row's `until` is when the guard may hold the range again. `evidence` is the guard's figures
-- as JSON (never a number).
CREATE TABLE destination_recent (
    tenant      TEXT    NOT NULL,
    dest_range  TEXT    NOT NULL,
    bucket      BIGINT  NOT NULL,
    sends       BIGINT  NOT NULL DEFAULT 0,
    conversions BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, dest_range, bucket)
);
CREATE TABLE quarantines (
    tenant     TEXT    NOT NULL,
    dest_range TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    since      BIGINT  NOT NULL,
    until      BIGINT,
    mode       TEXT    NOT NULL,
    evidence   TEXT,
    note       TEXT    NOT NULL,
    updated_at BIGINT  NOT NULL,
    PRIMARY KEY (tenant, dest_range)
);
