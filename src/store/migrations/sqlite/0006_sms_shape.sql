-- The SMS text's encoding (GSM_7 or UCS_2) and segment count, known before sending.
ALTER TABLE attempts ADD COLUMN sms_encoding TEXT;
ALTER TABLE attempts ADD COLUMN sms_segments INTEGER;
