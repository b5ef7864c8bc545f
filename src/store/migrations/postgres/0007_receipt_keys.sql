-- An attempt's end sets its outcome and the provider's message id. While the receipt index
-- read both (`attempts_awaiting_receipt`: provider and message id where the outcome is SENT),
-- every end was a new row version with a new entry in each of the attempt's indexes. Receipts
-- are now matched on `receipt_key`: the message id of an attempt whose provider reports the
-- message's fate (a delivery receipt), written once by the end that accepts it and left as it is
-- afterwards. Every other end (a push, a provider without receipts, a failure) changes no indexed
-- column and stays on the row's page as a heap-only update, for which each page keeps room.
ALTER TABLE attempts ADD COLUMN receipt_key TEXT;
-- Which attempts made before this migration await a receipt is not known: every one still SENT
-- keeps matching as before.
UPDATE attempts SET receipt_key = provider_message_id
    WHERE outcome = 'SENT' AND provider_message_id IS NOT NULL;
DROP INDEX attempts_awaiting_receipt;
CREATE INDEX attempts_by_receipt_key ON attempts (provider, receipt_key, id)
    WHERE receipt_key IS NOT NULL;
ALTER TABLE attempts SET (fillfactor = 50);
