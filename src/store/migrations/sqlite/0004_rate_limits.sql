-- Rate-limit rules (tenant '*' applies to every tenant) and the sends they count.
CREATE TABLE rate_limit_rules (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT    NOT NULL,
    scope       TEXT    NOT NULL,
    prefix      TEXT    NOT NULL DEFAULT '',
    max_sends   INTEGER NOT NULL,
    window_ms   INTEGER NOT NULL,
    UNIQUE (tenant, scope, prefix)
);

CREATE TABLE rate_hits (
    rule  INTEGER NOT NULL REFERENCES rate_limit_rules (id) ON DELETE CASCADE,
    key   TEXT    NOT NULL,
    at    INTEGER NOT NULL
);
CREATE INDEX rate_hits_by_key ON rate_hits (rule, key, at);
