-- When a failed attempt will be retried, and device acknowledgements (AcknowledgeDelivery).
ALTER TABLE attempts ADD COLUMN next_retry_at INTEGER;
ALTER TABLE targets ADD COLUMN ack TEXT;
ALTER TABLE targets ADD COLUMN ack_at INTEGER;
