//! Group commit for the SQLite ledger: every ledger write goes to one writer thread that owns
//! one connection, runs the writes waiting at that moment inside one transaction and commits
//! them with a single fsync. A caller hears back only after that commit, so "written" still
//! means "on disk". The thread runs the statements itself (rusqlite, cached statements): no
//! hop between threads per statement, which is what bounded the ledger before.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// The most writes committed together. Large enough that a busy gateway pays one fsync for
/// hundreds of writes, small enough that one transaction never holds the lock for long.
const MAX_BATCH: usize = 1024;

/// How many times a write is run again after being rolled back with a failing neighbour.
const MAX_RERUNS: usize = 3;

/// How a group transaction ended, as told to each write in it.
#[derive(Clone, Copy)]
enum Fate<'a> {
    /// Committed: the write is on disk.
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
type WriteOp = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

/// The handle callers write through; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct GroupWriter {
    ops: mpsc::UnboundedSender<WriteOp>,
    commits: Arc<AtomicU64>,
}

impl GroupWriter {
    /// Opens the writer's own connection to the (migrated) database at `path` and starts its
    /// thread.
    pub(super) fn start(path: &Path) -> Result<Self, StoreError> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(Duration::from_secs(10))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.set_prepared_statement_cache_capacity(64);
        let (ops, queue) = mpsc::unbounded_channel();
        let commits = Arc::<AtomicU64>::default();
        let counted = Arc::clone(&commits);
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || run(connection, queue, counted))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the ledger writer: {e}")))?;
        Ok(GroupWriter { ops, commits })
    }

    /// How many group transactions have been committed.
    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Runs `op` in the next group transaction and returns its result once that transaction
    /// is committed (or the error that undid it). A write rolled back because another write in
    /// its group failed runs again (hence `Clone`): one bad write never fails its neighbours.
    pub(super) async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Clone + Send + 'static,
    {
        for _ in 0..=MAX_RERUNS {
            let (reply, answer) = oneshot::channel();
            let op = op.clone();
            let boxed: WriteOp = Box::new(move |connection| {
                let result = op(connection);
                let ok = result.is_ok();
                let reply: Reply = Box::new(move |fate: Fate<'_>| {
                    let _ = reply.send(match (result, fate) {
                        (Err(error), _) => Answer::Done(Err(error)),
                        (Ok(value), Fate::Committed) => Answer::Done(Ok(value)),
                        (Ok(_), Fate::Undone) => Answer::Again,
                        (Ok(_), Fate::Failed(error)) => {
                            Answer::Done(Err(StoreError::Commit(error.to_owned())))
                        }
                    });
                });
                (ok, reply)
            });
            self.ops
                .send(boxed)
                .map_err(|_| StoreError::WriterStopped)?;
            // A write dropped unrun (its group was rolled back before it) has no answer.
            match answer.await.unwrap_or(Answer::Again) {
                Answer::Done(result) => return result,
                Answer::Again => continue,
            }
        }
        Err(StoreError::Commit(
            "the write was rolled back with failing writes too many times (see the log)".into(),
        ))
    }
}

/// The writer thread: waits for a write, takes every other write already waiting, and commits
/// them together. Ends when every handle is gone.
fn run(
    connection: Connection,
    mut queue: mpsc::UnboundedReceiver<WriteOp>,
    commits: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let ended = commit_batch(&connection, &mut batch, &mut replies);
        let fate = match &ended {
            Ok(true) => {
                commits.fetch_add(1, Ordering::Relaxed);
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
        for reply in replies.drain(..) {
            reply(fate);
        }
    }
}

/// Runs the batch in one transaction: true when committed, false when a write failed (the
/// writes after it are dropped unrun, and the caller rolls back), or the database's error.
/// There is no savepoint per write: a failing write is rare, and re-running its neighbours is
/// the cheaper way to keep them apart.
fn commit_batch(
    connection: &Connection,
    batch: &mut Vec<WriteOp>,
    replies: &mut Vec<Reply>,
) -> Result<bool, String> {
    // IMMEDIATE: the write lock is taken up front, so a reader upgrading cannot deadlock us.
    if let Err(error) = connection.execute_batch("BEGIN IMMEDIATE") {
        // The writes never ran; dropping them sends them round again.
        batch.clear();
        return Err(error.to_string());
    }
    for op in batch.drain(..) {
        let (ok, reply) = op(connection);
        replies.push(reply);
        if !ok {
            return Ok(false);
        }
    }
    connection
        .execute_batch("COMMIT")
        .map(|_| true)
        .map_err(|e| e.to_string())
}
