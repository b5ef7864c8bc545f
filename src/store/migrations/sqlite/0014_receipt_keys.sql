-- Receipts are matched on `receipt_key`: the message id of an attempt whose provider reports
-- the message's fate (a delivery receipt), written once by the end that accepts it and left as
-- it is afterwards; an attempt awaiting none (a push, a provider without receipts) is never
-- matched. As in the PostgreSQL ledger (its migration 0007 says why there).
ALTER TABLE attempts ADD COLUMN receipt_key TEXT;
-- Which attempts made before this migration await a receipt is not known: every one still SENT
-- keeps matching as before.
UPDATE attempts SET receipt_key = provider_message_id
    WHERE outcome = 'SENT' AND provider_message_id IS NOT NULL;
DROP INDEX attempts_awaiting_receipt;
CREATE INDEX attempts_by_receipt_key ON attempts (provider, receipt_key, id)
    WHERE receipt_key IS NOT NULL;
