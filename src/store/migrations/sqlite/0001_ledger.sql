-- The delivery ledger: one row per (tenant, job_id), its targets and every provider attempt.
-- The code is never stored; phone numbers are stored masked, device tokens not at all.
-- Times are microseconds since the Unix epoch (UTC).

CREATE TABLE deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT    NOT NULL,
    job_id      TEXT    NOT NULL,
    account     TEXT    NOT NULL,
    purpose     TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    reason      TEXT,
    summary     TEXT    NOT NULL DEFAULT '',
    owner       TEXT,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (tenant, job_id)
);
CREATE INDEX deliveries_by_account ON deliveries (tenant, account, id);
CREATE INDEX deliveries_by_status ON deliveries (tenant, status, id);

CREATE TABLE targets (
    delivery  INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    idx       INTEGER NOT NULL,
    channel   TEXT    NOT NULL,
    label     TEXT    NOT NULL,
    platform  TEXT,
    status    TEXT    NOT NULL,
    reason    TEXT,
    detail    TEXT,
    PRIMARY KEY (delivery, idx)
);

CREATE TABLE attempts (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery            INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    target_idx          INTEGER NOT NULL,
    provider            TEXT    NOT NULL,
    channel             TEXT    NOT NULL,
    masked_target       TEXT    NOT NULL,
    started_at          INTEGER NOT NULL,
    ended_at            INTEGER,
    outcome             TEXT    NOT NULL,
    reason              TEXT,
    provider_code       TEXT,
    provider_message    TEXT,
    provider_message_id TEXT,
    retry               INTEGER NOT NULL
);
CREATE INDEX attempts_by_delivery ON attempts (delivery, target_idx, id);
