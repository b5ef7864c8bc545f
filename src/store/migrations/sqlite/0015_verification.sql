-- What upstream reported of the user entering the code (ReportVerification): 1 entered, 0 did
-- not (or gave up), and when; NULL until a report comes. The conversion signal.
ALTER TABLE deliveries ADD COLUMN verified INTEGER;
ALTER TABLE deliveries ADD COLUMN verification_at INTEGER;
