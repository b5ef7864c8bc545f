-- What upstream reported of the user entering the code (ReportVerification): 1 entered, 0 did
-- not (or gave up), and when; NULL until a report comes. The conversion signal. Columns without
-- a default: adding them rewrites nothing.
ALTER TABLE deliveries ADD COLUMN verified SMALLINT, ADD COLUMN verification_at BIGINT;
