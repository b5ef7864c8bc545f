-- Block entries for numbers and device tokens are kept as keyed hashes under store.hash_key
-- (src/store/block_hash.rs), each with the masked form it is listed by (prefixes and accounts
-- have none: they are listed as they are). The key is not in the database, so the number and
-- token entries made before are hashed by the gateway when it opens the ledger: until then
-- they are the ones with no masked form (shown IS NULL).
ALTER TABLE block_entries ADD COLUMN shown TEXT;
