//! Block entries for numbers and device tokens are stored as keyed hashes, never in clear: an
//! HMAC-SHA256 under `store.hash_key`, a secret kept apart from the database (a copy of the
//! database alone does not give the numbers back, even by trying every number). Exact matches
//! still work (a job's numbers and tokens are hashed the same way to look entries up); prefix
//! and account entries stay as they are. Each entry keeps a masked form to be listed by.
//!
//! The database records the key's fingerprint: a gateway started with another key refuses to
//! start rather than silently stop matching every hashed entry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::domain::SecretString;
use crate::policy::{BlockEntry, BlockKind};
use crate::store::StoreError;

/// What a stored hash starts with (and a clear number or token never does: numbers start with
/// `+`, and no clear token is stored any more).
const HASHED: &str = "hmac:";

/// How an erased account's kept opt-outs are listed.
pub(crate) const ERASED_ACCOUNT: &str = "(erased account)";

/// The name of the key's fingerprint in the ledger's `ledger_secrets` table.
pub(crate) const FINGERPRINT: &str = "block_hash_fingerprint";

/// The shortest `store.hash_key` accepted.
pub const HASH_KEY_MIN_LEN: usize = 32;

/// Hashes the numbers and tokens of block entries.
#[derive(Clone)]
pub(crate) struct BlockHasher(ring::hmac::Key);

impl std::fmt::Debug for BlockHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockHasher(redacted)")
    }
}

impl BlockHasher {
    /// A hasher under `secret`.
    pub(crate) fn new(secret: &[u8]) -> Self {
        BlockHasher(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    fn hash(&self, value: &str) -> String {
        let tag = ring::hmac::sign(&self.0, value.as_bytes());
        let hex: String = tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{HASHED}{hex}")
    }

    /// What identifies the key without giving it away (stored in the database to catch a
    /// changed key).
    pub(crate) fn fingerprint(&self) -> Vec<u8> {
        let tag = ring::hmac::sign(&self.0, b"otp-gateway block-list key fingerprint v1");
        tag.as_ref()[..16].to_vec()
    }

    /// The pattern of an entry of `kind` as stored, and the masked form it is listed by:
    /// numbers and tokens hashed and masked; prefixes and accounts as they are, with no masked
    /// form (the pattern is shown).
    pub(crate) fn stored(&self, kind: BlockKind, pattern: &str) -> (String, Option<String>) {
        match kind {
            BlockKind::Number | BlockKind::DeviceToken => {
                (self.hash(pattern), Some(kind.shown(pattern)))
            }
            BlockKind::Prefix | BlockKind::Account => (pattern.to_owned(), None),
        }
    }

    /// An erased account as its kept opt-outs store it: hashed (they still block it), and how
    /// they are listed.
    pub(crate) fn erased_account(&self, account: &str) -> (String, &'static str) {
        (self.hash(account), ERASED_ACCOUNT)
    }

    /// The patterns to look entries up by for a job's `patterns` (its account, numbers and
    /// tokens): each as it is and hashed, with the way back from a hash to what it hashes.
    pub(crate) fn lookup(&self, patterns: &[&str]) -> Lookup {
        let mut keys = Vec::with_capacity(patterns.len() * 2);
        let mut clear = HashMap::with_capacity(patterns.len());
        for pattern in patterns {
            let hashed = self.hash(pattern);
            keys.push((*pattern).to_owned());
            keys.push(hashed.clone());
            clear.insert(hashed, (*pattern).to_owned());
        }
        Lookup { keys, clear }
    }
}

/// The keys a job's block entries are looked up by, and the way back to clear.
pub(crate) struct Lookup {
    /// Every pattern as it is, and hashed.
    pub(crate) keys: Vec<String>,
    clear: HashMap<String, String>,
}

impl Lookup {
    /// The entries found, with the hashed patterns given back in clear (the job's own number
    /// or token they matched), as matching a job's targets needs them.
    pub(crate) fn reveal(&self, mut entries: Vec<BlockEntry>) -> Vec<BlockEntry> {
        for entry in &mut entries {
            if let Some(clear) = self.clear.get(&entry.pattern) {
                entry.pattern.clone_from(clear);
            }
        }
        entries
    }
}

/// What opening a ledger does about the key's fingerprint it holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fingerprint {
    /// It is this key's: nothing to do.
    Same,
    /// None is stored, or another key's with no entry hashed under it: store this key's.
    Store,
}

impl BlockHasher {
    /// Whether the ledger may be used with this key, given the fingerprint it holds and how
    /// many entries it holds hashed; another key's with hashed entries is refused.
    pub(crate) fn check(
        &self,
        stored: Option<&[u8]>,
        hashed_entries: i64,
    ) -> Result<Fingerprint, StoreError> {
        match stored {
            Some(stored) if stored == self.fingerprint().as_slice() => Ok(Fingerprint::Same),
            Some(_) if hashed_entries > 0 => Err(other_key()),
            _ => Ok(Fingerprint::Store),
        }
    }

    /// Entries made before hashing (`id, kind, pattern`), as they are to be stored: `id`, the
    /// hashed pattern, and the masked one.
    pub(crate) fn rehash(
        &self,
        legacy: Vec<(i64, String, String)>,
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        legacy
            .into_iter()
            .map(|(id, kind, pattern)| {
                let kind: BlockKind = kind.parse().map_err(|_| {
                    StoreError::Corrupt(format!("block entry #{id} has the kind `{kind}`"))
                })?;
                Ok((id, self.hash(&pattern), kind.shown(&pattern)))
            })
            .collect()
    }
}

/// The entries made before hashing: clear numbers and tokens, with no masked form yet.
pub(crate) const LEGACY_ENTRIES: &str = "SELECT id, kind, pattern FROM block_entries
     WHERE shown IS NULL AND kind IN ('NUMBER', 'DEVICE_TOKEN')";

/// How many entries are hashed.
pub(crate) const HASHED_ENTRIES: &str = "SELECT count(*) FROM block_entries
     WHERE shown IS NOT NULL AND kind IN ('NUMBER', 'DEVICE_TOKEN')";

/// The key: `store.hash_key`; else, for an SQLite ledger in a file, one made (32 random bytes,
/// hex) the first time in `<database>.hash-key` beside it, readable by its owner only; an
/// in-memory ledger gets a fresh one. `None` where a key must be configured (PostgreSQL:
/// every replica must hash with the same key).
pub(crate) fn key_for_sqlite(
    configured: Option<&SecretString>,
    database: &Path,
) -> Result<BlockHasher, StoreError> {
    if let Some(key) = configured {
        return Ok(BlockHasher::new(key.expose().as_bytes()));
    }
    let fresh = crate::store::shared::RateCounterKey::fresh_secret()?;
    let name = database.to_string_lossy();
    if name.is_empty() || name == ":memory:" {
        return Ok(BlockHasher::new(&fresh));
    }
    let path = sidecar(database);
    match std::fs::read_to_string(&path) {
        Ok(key) if key.trim().len() >= HASH_KEY_MIN_LEN => {
            return Ok(BlockHasher::new(key.trim().as_bytes()));
        }
        Ok(_) => {
            return Err(StoreError::Unavailable(format!(
                "the block-list hash key in {} is shorter than {HASH_KEY_MIN_LEN} characters \
                 (store.hash_key)",
                path.display()
            )));
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(StoreError::Unavailable(format!(
                "cannot read the block-list hash key {} (store.hash_key): {error}",
                path.display()
            )));
        }
    }
    let key: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &key).map_err(|error| {
        StoreError::Unavailable(format!(
            "cannot write the block-list hash key {} (set store.hash_key or \
             store.hash_key_file instead): {error}",
            path.display()
        ))
    })?;
    tracing::info!(file = %path.display(), "made the block-list hash key (keep it with the database's backups, apart from them)");
    Ok(BlockHasher::new(key.as_bytes()))
}

/// `<database>.hash-key`.
pub fn sidecar(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".hash-key");
    PathBuf::from(name)
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// The refusal when the database's entries were hashed under another key.
pub(crate) fn other_key() -> StoreError {
    StoreError::Unavailable(
        "store.hash_key is not the key this database's block-list numbers and tokens were \
         hashed with (its fingerprint differs): with it no such entry would ever match. Start \
         with the key they were made with; to give those entries up instead, delete them \
         (DELETE FROM block_entries WHERE kind IN ('NUMBER', 'DEVICE_TOKEN')) and the row \
         'block_hash_fingerprint' of ledger_secrets"
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_tokens_are_hashed_and_found_again_in_clear() {
        let hasher = BlockHasher::new(&[3; 32]);
        let (number, shown) = hasher.stored(BlockKind::Number, "+14155550101");
        assert_eq!(shown.as_deref(), Some("+1415•••0101"));
        assert!(
            number.starts_with(HASHED) && !number.contains("4155550101"),
            "{number}"
        );
        assert_eq!(number.len(), HASHED.len() + 32);
        assert_eq!(
            hasher.stored(BlockKind::Prefix, "+882"),
            ("+882".into(), None)
        );
        assert_eq!(
            hasher.stored(BlockKind::Account, "user-1"),
            ("user-1".into(), None)
        );
        assert_ne!(
            BlockHasher::new(&[4; 32])
                .stored(BlockKind::Number, "+14155550101")
                .0,
            number,
            "another key, another hash"
        );
        let lookup = hasher.lookup(&["user-1", "+14155550101"]);
        assert!(lookup.keys.contains(&number));
        assert!(lookup.keys.contains(&"user-1".to_owned()));
        assert_eq!(BlockKind::Number.shown("+14155550101"), "+1415•••0101");
    }

    #[test]
    fn an_sqlite_ledger_gets_a_private_key_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("ledger.db");
        let first = key_for_sqlite(None, &database).unwrap();
        let again = key_for_sqlite(None, &database).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        let file = sidecar(&database);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let configured = SecretString::new("k".repeat(40));
        assert_ne!(
            key_for_sqlite(Some(&configured), &database)
                .unwrap()
                .fingerprint(),
            first.fingerprint()
        );
        std::fs::write(&file, "short").unwrap();
        assert!(
            key_for_sqlite(None, &database)
                .unwrap_err()
                .to_string()
                .contains("store.hash_key")
        );
    }
}
