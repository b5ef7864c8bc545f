-- Targets and attempts refer to their delivery without a foreign key. The key's check ran a
-- query for every target and attempt inserted and locked the delivery's row for it (a row
-- version's lock written to the log), on the hot path of every job; a delivery's targets and
-- attempts are only ever written by statements that have just found the delivery (its claim, or
-- its owner's writes fenced on it), and are deleted with it by the statements that delete
-- deliveries (the retention purge, an account's erasure, a forgotten acceptance), in the same
-- statement.
ALTER TABLE targets DROP CONSTRAINT targets_delivery_fkey;
ALTER TABLE attempts DROP CONSTRAINT attempts_delivery_fkey;
