-- Quiet-hours rules. tenant '*' applies to every tenant; account '' to every account.
-- channels and days are comma-separated ('' for all); start and end are local HH:MM.
CREATE TABLE quiet_rules (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
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
