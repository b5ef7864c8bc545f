-- For a dead push token: since when the push service has known it is invalid (APNs' 410
-- timestamp), in microseconds since the epoch like every other instant here.
ALTER TABLE attempts ADD COLUMN token_invalid_since INTEGER;
