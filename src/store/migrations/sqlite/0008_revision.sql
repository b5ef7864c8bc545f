-- Counts the writes that changed a delivery's row or its targets (not attempt starts): the
-- delivery engine knows how many were its own, so at the end it can tell whether its copy of
-- the report is still exact or something else (an acknowledgement, a receipt) wrote meanwhile.
ALTER TABLE deliveries ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
