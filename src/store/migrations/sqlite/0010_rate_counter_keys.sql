-- Rate-limit counters no longer keep numbers, tokens or accounts in clear beside timestamps (a
-- per-person send history): they are keyed by an HMAC-SHA256 under a random key made when the
-- ledger is first opened. Hits counted under clear keys are dropped (windows start afresh).
CREATE TABLE ledger_secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
DELETE FROM rate_hits;
