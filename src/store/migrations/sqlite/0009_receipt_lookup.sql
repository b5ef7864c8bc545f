-- Receipts are matched to the newest attempt on the same provider (bind, account) that carries
-- the message id and still waits for its fate (outcome SENT): SMSCs reuse message ids after a
-- restart or a counter wrap, and an attempt already final is never rewritten.
CREATE INDEX attempts_awaiting_receipt ON attempts (provider, provider_message_id, id)
    WHERE outcome = 'SENT';
