-- API keys (tenant '*': every tenant). The secret is never stored: only its SHA-256.
CREATE TABLE api_keys (
    id          TEXT    PRIMARY KEY,
    tenant      TEXT    NOT NULL,
    scopes      TEXT    NOT NULL,
    label       TEXT    NOT NULL DEFAULT '',
    secret_hash TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
