//! Group commit for the SQLite ledger, in two stages on two threads.
//!
//! - The writer thread owns the one write connection. It takes every write waiting, runs them
//!   in one transaction and commits it without waiting for the disk: the commit writes its WAL
//!   frames and the writes are visible to readers at once. Callers hear back then.
//! - The syncer thread makes commits durable: it fsyncs the WAL file, and every commit made
//!   before that fsync began is on disk when it returns. [`GroupWriter::write`] waits for that;
//!   [`GroupWriter::stage`] does not (its caller calls [`GroupWriter::flush`] before it tells
//!   anyone that must not see the write undone by a power cut: the gateway, before the ack).
//!
//! So the writer never stops for the disk, and one fsync covers every commit made while the
//! previous one ran. This is `synchronous = FULL` with the fsync moved off the writer:
//! SQLite's FULL mode is NORMAL plus a WAL fsync at each commit, and in NORMAL mode SQLite
//! still syncs the WAL before each checkpoint copies it into the database, and the database
//! after. The statements run on the writer thread itself (rusqlite, cached statements): no hop
//! between threads per statement.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use crate::store::{CommitWatch, StoreError};

/// The most writes committed together. Large enough that a busy gateway commits hundreds of
/// writes at once, small enough that one transaction never holds the lock for long.
const MAX_BATCH: usize = 1024;

/// How many times a write is run again after being rolled back with a failing neighbour.
const MAX_RERUNS: usize = 3;

/// The number of a committed group transaction (1, 2, …); 0 is "none yet".
type CommitSeq = u64;

/// How a group transaction ended, as told to each write in it.
#[derive(Clone, Copy)]
enum Fate<'a> {
    /// Committed (visible to readers; for a durable write, on disk too).
    Committed,
    /// Rolled back because another write in the group failed: the write must run again.
    Undone,
    /// The commit itself failed.
    Failed(&'a str),
}

/// What a caller hears.
enum Answer<T> {
    Done(Result<T, StoreError>),
    /// Rolled back with a failing neighbour, or never run: submit it again.
    Again,
}

/// How to answer a write's caller once its group's fate is known.
type Reply = Box<dyn FnOnce(Fate<'_>) + Send>;

/// One write: runs its statements inside the open transaction; whether they succeeded, and
/// the reply.
type Run = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

/// A write and when its caller hears back.
struct WriteOp {
    run: Run,
    /// Once on disk (the syncer answers), rather than once committed.
    durable: bool,
    /// Deletes personal data: once committed, the WAL is checkpointed and truncated, so that
    /// the deleted rows' old pages do not linger in it (the database's own pages are
    /// overwritten: `secure_delete`).
    scrub: bool,
}

/// How far the commits are on disk.
#[derive(Debug, Clone)]
enum Durable {
    /// Every commit up to this one.
    Upto(CommitSeq),
    /// An fsync failed: what is on disk is unknown, so nothing more is called durable.
    Failed(Arc<str>),
}

/// What the writer tells the syncer.
#[derive(Default)]
struct SyncWanted {
    /// The last commit made.
    committed: CommitSeq,
    /// Durable writes committed, to answer once their commit is on disk.
    replies: Vec<(CommitSeq, Reply)>,
    /// Why syncing stopped, if it failed (durable writes are answered with it at once).
    failed: Option<Arc<str>>,
    /// The writer has stopped (after its last commit).
    stopped: bool,
}

impl std::fmt::Debug for SyncWanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncWanted")
            .field("committed", &self.committed)
            .field("replies", &self.replies.len())
            .field("failed", &self.failed)
            .field("stopped", &self.stopped)
            .finish()
    }
}

/// The commit sequence, shared by the writer, the syncer and the handles.
#[derive(Debug)]
struct Commits {
    wanted: Mutex<SyncWanted>,
    wake_syncer: Condvar,
}

/// The handle callers write through; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct GroupWriter {
    ops: mpsc::UnboundedSender<WriteOp>,
    commits: Arc<Commits>,
    durable: watch::Receiver<Durable>,
    /// Told of each group transaction.
    pub(super) watch: CommitWatch,
    /// Dropped after `ops` (fields drop in order): with the last handle, the queue closes and
    /// the writer thread is waited for.
    _thread: Arc<WriterThread>,
}

/// The writer thread, waited for when the last handle goes: it ends once its queue is closed
/// and it has closed its connection (which, as the database's last, checkpoints the WAL under
/// an exclusive lock), so a ledger dropped can be opened again at once (a restart, a test).
#[derive(Debug)]
struct WriterThread(Option<std::thread::JoinHandle<()>>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            // A handle dropped on the writer thread itself (in a write's reply) cannot wait.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl GroupWriter {
    /// Opens the writer's own connection to the (migrated) database at `path` and starts its
    /// thread and the syncer's.
    pub(super) fn start(path: &Path) -> Result<Self, StoreError> {
        let watch = CommitWatch::default();
        let connection = Connection::open(path)?;
        connection.busy_timeout(Duration::from_secs(10))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        // The syncer thread fsyncs the WAL (see the module documentation).
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        // Deleted rows (purged or erased deliveries) are overwritten, not left in free pages.
        connection.pragma_update(None, "secure_delete", "ON")?;
        connection.set_prepared_statement_cache_capacity(64);
        let (ops, queue) = mpsc::unbounded_channel();
        let commits = Arc::new(Commits {
            wanted: Mutex::default(),
            wake_syncer: Condvar::new(),
        });
        let (durable, durable_rx) = watch::channel(Durable::Upto(0));
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let syncing = Arc::clone(&commits);
        std::thread::Builder::new()
            .name("ledger-sync".into())
            .spawn(move || sync(&wal, &syncing, &durable))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the ledger syncer: {e}")))?;
        let writing = Arc::clone(&commits);
        let watching = watch.clone();
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || run(connection, queue, &writing, &watching))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the ledger writer: {e}")))?;
        Ok(GroupWriter {
            ops,
            commits,
            durable: durable_rx,
            watch,
            _thread: Arc::new(WriterThread(Some(thread))),
        })
    }

    /// How many group transactions have been committed.
    pub(super) fn commits(&self) -> u64 {
        self.commits
            .wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .committed
    }

    /// How many of them are not known to be on disk yet.
    #[cfg(test)]
    fn unsynced(&self) -> u64 {
        let committed = self.commits();
        match &*self.durable.borrow() {
            Durable::Upto(synced) => committed.saturating_sub(*synced),
            Durable::Failed(_) => committed,
        }
    }

    /// Runs `op` in the next group transaction and returns its result once that transaction
    /// is committed and on disk (or the error that undid it).
    pub(super) async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Clone + Send + 'static,
    {
        // Answered by the syncer once on disk: the caller wakes once.
        self.commit(op, true, false).await
    }

    /// As [`Self::write`], for a write that deletes personal data: the WAL is checkpointed
    /// and truncated after its commit (see [`WriteOp::scrub`]).
    pub(super) async fn erase<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Clone + Send + 'static,
    {
        self.commit(op, true, true).await
    }

    /// Runs `op` in the next group transaction and returns its result once that transaction
    /// is committed: readers see it, but a crash may still undo it until [`Self::flush`].
    pub(super) async fn stage<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Clone + Send + 'static,
    {
        self.commit(op, false, false).await
    }

    /// Waits until every transaction committed so far is on disk.
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let seq = self.commits();
        if seq == 0 {
            return Ok(());
        }
        let mut durable = self.durable.clone();
        let state = durable
            .wait_for(|state| match state {
                Durable::Upto(synced) => *synced >= seq,
                Durable::Failed(_) => true,
            })
            .await
            .map_err(|_| StoreError::Unavailable("the ledger writer has stopped".to_owned()))?;
        match &*state {
            Durable::Upto(_) => Ok(()),
            Durable::Failed(error) => Err(StoreError::Unavailable(sync_failure(error))),
        }
    }

    /// Runs `op` in the next group transaction; its result once committed (or, `durable`, once
    /// on disk too). A write rolled back because another write in its group failed runs again
    /// (hence `Clone`): one bad write never fails its neighbours.
    async fn commit<T, F>(&self, op: F, durable: bool, scrub: bool) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Clone + Send + 'static,
    {
        for _ in 0..=MAX_RERUNS {
            let (reply, answer) = oneshot::channel();
            let op = op.clone();
            let run: Run = Box::new(move |connection| {
                let result = op(connection);
                let ok = result.is_ok();
                let reply: Reply = Box::new(move |fate: Fate<'_>| {
                    let _ = reply.send(match (result, fate) {
                        (Err(error), _) => Answer::Done(Err(error)),
                        (Ok(value), Fate::Committed) => Answer::Done(Ok(value)),
                        (Ok(_), Fate::Undone) => Answer::Again,
                        (Ok(_), Fate::Failed(error)) => {
                            Answer::Done(Err(StoreError::Unavailable(error.to_owned())))
                        }
                    });
                });
                (ok, reply)
            });
            self.ops
                .send(WriteOp {
                    run,
                    durable,
                    scrub,
                })
                .map_err(|_| StoreError::Unavailable("the ledger writer has stopped".to_owned()))?;
            // A write dropped unrun (its group was rolled back before it) has no answer.
            match answer.await.unwrap_or(Answer::Again) {
                Answer::Done(result) => return result,
                Answer::Again => continue,
            }
        }
        Err(StoreError::Unavailable(
            "the write was rolled back with failing writes too many times (see the log)".into(),
        ))
    }
}

/// The writer thread: waits for a write, takes every other write already waiting, and commits
/// them together; tells the syncer. Ends when every handle is gone.
fn run(
    connection: Connection,
    mut queue: mpsc::UnboundedReceiver<WriteOp>,
    commits: &Commits,
    watch: &CommitWatch,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    let mut seq = 0;
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let scrub = batch.iter().any(|op| op.scrub);
        let (writes, began) = (batch.len(), std::time::Instant::now());
        let ended = commit_batch(&connection, &mut batch, &mut replies);
        if let Ok(true) = ended {
            watch.committed("sqlite", "group", writes, began.elapsed());
        }
        let fate = match &ended {
            Ok(true) => {
                seq += 1;
                let mut wanted = commits.wanted.lock().unwrap_or_else(|p| p.into_inner());
                wanted.committed = seq;
                match wanted.failed.clone() {
                    // Nothing is called durable any more: durable writes hear it at once
                    // (staged ones are committed, as they hear below).
                    Some(error) => {
                        drop(wanted);
                        for (_, reply) in replies.extract_if(.., |(durable, _)| *durable) {
                            reply(Fate::Failed(&sync_failure(&error)));
                        }
                    }
                    None => {
                        let durable = replies.extract_if(.., |(durable, _)| *durable);
                        wanted
                            .replies
                            .extend(durable.map(|(_, reply)| (seq, reply)));
                        commits.wake_syncer.notify_one();
                    }
                }
                Fate::Committed
            }
            Ok(false) => {
                let _ = connection.execute_batch("ROLLBACK");
                Fate::Undone
            }
            Err(error) => {
                tracing::error!(%error, writes = replies.len(), "ledger group commit failed");
                let _ = connection.execute_batch("ROLLBACK");
                Fate::Failed(error)
            }
        };
        for (_, reply) in replies.drain(..) {
            reply(fate);
        }
        if scrub && matches!(fate, Fate::Committed) {
            truncate_wal(&connection);
        }
    }
    // What was written last leaves the WAL too (it is not deleted while a reader is open).
    truncate_wal(&connection);
    commits
        .wanted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .stopped = true;
    commits.wake_syncer.notify_one();
}

/// Copies the WAL into the database and empties it.
fn truncate_wal(connection: &Connection) {
    let checkpoint = connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        row.get::<_, i64>(0)
    });
    match checkpoint {
        Ok(0) => {}
        Ok(_) => tracing::warn!(
            "the ledger's WAL could not be emptied now (readers were busy): its old pages go with the next checkpoint"
        ),
        Err(error) => tracing::warn!(%error, "the ledger's WAL could not be emptied"),
    }
}

/// Runs the batch in one transaction: true when committed, false when a write failed (the
/// writes after it are dropped unrun, and the caller rolls back), or the database's error.
/// There is no savepoint per write: a failing write is rare, and re-running its neighbours is
/// the cheaper way to keep them apart.
fn commit_batch(
    connection: &Connection,
    batch: &mut Vec<WriteOp>,
    replies: &mut Vec<(bool, Reply)>,
) -> Result<bool, String> {
    // IMMEDIATE: the write lock is taken up front, so a reader upgrading cannot deadlock us.
    if let Err(error) = connection.execute_batch("BEGIN IMMEDIATE") {
        // The writes never ran; dropping them sends them round again.
        batch.clear();
        return Err(error.to_string());
    }
    for op in batch.drain(..) {
        let (ok, reply) = (op.run)(connection);
        replies.push((op.durable, reply));
        if !ok {
            return Ok(false);
        }
    }
    connection
        .execute_batch("COMMIT")
        .map(|_| true)
        .map_err(|e| e.to_string())
}

/// The syncer thread: whenever commits are newer than the last fsync, fsyncs the WAL file and
/// announces every commit made before it began as durable. Ends after the writer, once its
/// last commit is synced; an fsync failure ends it at once (nothing is called durable after).
fn sync(wal: &Path, commits: &Commits, durable: &watch::Sender<Durable>) {
    let mut file: Option<(File, u64)> = None;
    let mut synced = 0;
    let mut answered = Vec::new();
    loop {
        let target = {
            let mut wanted = commits.wanted.lock().unwrap_or_else(|p| p.into_inner());
            while wanted.committed <= synced && !wanted.stopped {
                wanted = commits
                    .wake_syncer
                    .wait(wanted)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if wanted.committed <= synced {
                return;
            }
            wanted.committed
        };
        let result = sync_wal(wal, &mut file);
        let mut wanted = commits.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = result {
            tracing::error!(%error, wal = %wal.display(), "cannot sync the ledger's WAL to disk: nothing more is acknowledged until the gateway restarts");
            let error: Arc<str> = error.to_string().into();
            wanted.failed = Some(Arc::clone(&error));
            let replies = std::mem::take(&mut wanted.replies);
            drop(wanted);
            durable.send_replace(Durable::Failed(Arc::clone(&error)));
            for (_, reply) in replies {
                reply(Fate::Failed(&sync_failure(&error)));
            }
            return;
        }
        synced = target;
        answered.extend(wanted.replies.extract_if(.., |(seq, _)| *seq <= synced));
        drop(wanted);
        durable.send_replace(Durable::Upto(synced));
        for (_, reply) in answered.drain(..) {
            reply(Fate::Committed);
        }
    }
}

/// What a write hears when its commit could not be made durable.
fn sync_failure(error: &str) -> String {
    format!(
        "the ledger could not be synced to disk ({error}); restart the gateway once the disk is healthy"
    )
}

/// fdatasync of the WAL file, (re)opened when it is not open yet or is another file now.
fn sync_wal(path: &Path, file: &mut Option<(File, u64)>) -> std::io::Result<()> {
    let inode = std::fs::metadata(path)?.ino();
    match file {
        Some((open, open_inode)) if *open_inode == inode => open.sync_data(),
        _ => {
            let open = File::open(path)?;
            open.sync_data()?;
            *file = Some((open, inode));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(dir: &tempfile::TempDir) -> GroupWriter {
        let path = dir.path().join("writer.db");
        let connection = Connection::open(&path).unwrap();
        connection
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (v INTEGER);")
            .unwrap();
        GroupWriter::start(&path).unwrap()
    }

    fn insert(value: i64) -> impl FnOnce(&Connection) -> Result<i64, StoreError> + Clone {
        move |conn| {
            conn.execute("INSERT INTO t (v) VALUES (?)", [value])?;
            Ok(conn.last_insert_rowid())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_return_once_synced_and_staged_ones_once_committed_until_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(&dir);
        for value in 0..20 {
            writer.write(insert(value)).await.unwrap();
            assert_eq!(
                writer.unsynced(),
                0,
                "a write returned before the WAL was synced"
            );
        }
        let staged: Vec<_> = (0..50).map(|value| writer.stage(insert(value))).collect();
        for id in futures_util::future::join_all(staged).await {
            id.unwrap();
        }
        // Committed: a reader sees them all.
        let reader = Connection::open(dir.path().join("writer.db")).unwrap();
        let count: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .unwrap();
        assert_eq!(count, 70);
        writer.flush().await.unwrap();
        assert_eq!(writer.unsynced(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failed_sync_durable_writes_and_flushes_fail_and_staged_ones_still_commit() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(&dir);
        writer.write(insert(1)).await.unwrap();
        // The disk fails: the WAL can no longer be synced.
        std::fs::remove_file(dir.path().join("writer.db-wal")).unwrap();
        writer.stage(insert(2)).await.unwrap();
        let error = writer.flush().await.unwrap_err().to_string();
        assert!(error.contains("could not be synced"), "{error}");
        let error = writer.write(insert(3)).await.unwrap_err().to_string();
        assert!(error.contains("could not be synced"), "{error}");
        // Committed, not durable: a staged write is answered as such.
        for value in 4..8 {
            writer.stage(insert(value)).await.unwrap();
        }
        assert!(writer.flush().await.is_err());
    }
}
