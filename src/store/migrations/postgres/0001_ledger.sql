-- The PostgreSQL ledger, shared by every replica: one row per (tenant, job_id), its targets
-- and every provider attempt, the policy rules and the rate-limit counters. The code is never
-- stored; phone numbers are stored masked, device tokens only in block entries. Times are
-- microseconds since the Unix epoch (UTC), as in the SQLite ledger.

CREATE TABLE deliveries (
    id           BIGSERIAL PRIMARY KEY,
    tenant       TEXT    NOT NULL,
    job_id       TEXT    NOT NULL,
    account      TEXT    NOT NULL,
    purpose      TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    reason       TEXT,
    summary      TEXT    NOT NULL DEFAULT '',
    -- The replica (worker) delivering it, and until when its claim holds unless renewed.
    owner        TEXT,
    lease_until  BIGINT,
    expires_at   BIGINT  NOT NULL,
    created_at   BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL,
    -- Counts the writes that changed the row or its targets (not attempt starts).
    revision     BIGINT  NOT NULL DEFAULT 0,
    UNIQUE (tenant, job_id)
);
CREATE INDEX deliveries_by_account ON deliveries (tenant, account, id);
CREATE INDEX deliveries_by_status ON deliveries (tenant, status, id);
CREATE INDEX deliveries_by_owner ON deliveries (owner) WHERE status = 'IN_PROGRESS';

CREATE TABLE targets (
    delivery  BIGINT  NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    idx       INTEGER NOT NULL,
    channel   TEXT    NOT NULL,
    label     TEXT    NOT NULL,
    platform  TEXT,
    status    TEXT    NOT NULL,
    reason    TEXT,
    detail    TEXT,
    ack       TEXT,
    ack_at    BIGINT,
    PRIMARY KEY (delivery, idx)
);

CREATE TABLE attempts (
    id                   BIGSERIAL PRIMARY KEY,
    delivery             BIGINT  NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    target_idx           INTEGER NOT NULL,
    provider             TEXT    NOT NULL,
    channel              TEXT    NOT NULL,
    masked_target        TEXT    NOT NULL,
    started_at           BIGINT  NOT NULL,
    ended_at             BIGINT,
    outcome              TEXT    NOT NULL,
    reason               TEXT,
    provider_code        TEXT,
    provider_message     TEXT,
    provider_message_id  TEXT,
    retry                INTEGER NOT NULL,
    next_retry_at        BIGINT,
    sms_encoding         TEXT,
    sms_segments         INTEGER,
    token_invalid_since  BIGINT
);
CREATE INDEX attempts_by_delivery ON attempts (delivery, target_idx, id);
-- Receipts match the newest attempt on the same provider that carries the message id and
-- still waits for its fate (outcome SENT).
CREATE INDEX attempts_awaiting_receipt ON attempts (provider, provider_message_id, id)
    WHERE outcome = 'SENT';

-- Block-list entries. tenant '*' applies to every tenant.
CREATE TABLE block_entries (
    id          BIGSERIAL PRIMARY KEY,
    tenant      TEXT   NOT NULL,
    kind        TEXT   NOT NULL,
    pattern     TEXT   NOT NULL,
    source      TEXT   NOT NULL,
    note        TEXT   NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    UNIQUE (tenant, kind, pattern)
);
CREATE INDEX block_entries_by_pattern ON block_entries (pattern);

-- Rate-limit rules (tenant '*' applies to every tenant) and the sends they count, keyed by an
-- HMAC of the counter's key (no send history of a person in clear).
CREATE TABLE rate_limit_rules (
    id         BIGSERIAL PRIMARY KEY,
    tenant     TEXT   NOT NULL,
    scope      TEXT   NOT NULL,
    prefix     TEXT   NOT NULL DEFAULT '',
    max_sends  BIGINT NOT NULL,
    window_ms  BIGINT NOT NULL,
    UNIQUE (tenant, scope, prefix)
);
CREATE TABLE rate_hits (
    rule  BIGINT NOT NULL REFERENCES rate_limit_rules (id) ON DELETE CASCADE,
    key   TEXT   NOT NULL,
    at    BIGINT NOT NULL
);
CREATE INDEX rate_hits_by_key ON rate_hits (rule, key, at);

-- Quiet-hours rules. tenant '*' applies to every tenant; account '' to every account.
-- channels and days are comma-separated ('' for all); start and end are local HH:MM.
CREATE TABLE quiet_rules (
    id            BIGSERIAL PRIMARY KEY,
    tenant        TEXT NOT NULL,
    account       TEXT NOT NULL DEFAULT '',
    channels      TEXT NOT NULL DEFAULT '',
    start_time    TEXT NOT NULL,
    end_time      TEXT NOT NULL,
    days          TEXT NOT NULL DEFAULT '',
    action        TEXT NOT NULL,
    default_zone  TEXT NOT NULL
);
CREATE INDEX quiet_rules_by_tenant ON quiet_rules (tenant);

CREATE TABLE ledger_secrets (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

-- Every change of a delivery (its revision moves) is announced to the replicas listening on
-- `otp_delivery_changed` with the delivery's id: a replica waiting for an acknowledgement or a
-- receipt, or streaming WatchDelivery, wakes without polling. Sent when the write commits.
CREATE FUNCTION otp_announce_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('otp_delivery_changed', NEW.tenant || '/' || NEW.job_id);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER deliveries_changed
    AFTER UPDATE OF revision ON deliveries
    FOR EACH ROW WHEN (OLD.revision IS DISTINCT FROM NEW.revision)
    EXECUTE FUNCTION otp_announce_change();
