-- Block-list entries. tenant '*' applies to every tenant.
CREATE TABLE block_entries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    pattern     TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    note        TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    UNIQUE (tenant, kind, pattern)
);
CREATE INDEX block_entries_by_pattern ON block_entries (pattern);
