//! Statements shared by many deliveries: the engine's hot writes of every delivery in flight
//! are gathered per kind and run as one multi-row statement (one round trip and one commit for
//! the lot), as the SQLite ledger's group writer runs them in one transaction.
//!
//! A [`Batcher`] runs at most [`IN_FLIGHT`] statements of its kind at once; what arrives while
//! they run waits and goes in the next one, so a quiet gateway pays no delay and a busy one
//! sends hundreds of writes per statement. A batch holds at most one write per delivery (a
//! second one waits for the next batch), so each write moves the delivery's revision by
//! exactly one and the statements lock deliveries in key order. When a batch's statement fails
//! (a deadlock with a receipt, a lost connection), each of its writes runs again on its own, so
//! one bad write never fails its neighbours.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::{CommitWatch, StoreError};

/// Statements of one kind running at once. One: with two, batches were half as large and
/// queued behind each other for the database's CPU (BENCHMARKS.md, replicas: 0.59 against
/// 0.36–0.42 of the SQLite drain).
const IN_FLIGHT: usize = 1;

/// The most writes in one statement.
const MAX_BATCH: usize = 512;

/// What a batch's statement returns: per write, in the order given, its answer; or the error
/// of the whole statement.
pub(super) type BatchResult<O> = Result<Vec<Result<O, StoreError>>, StoreError>;

/// Runs one batch's statement on a connection of `pool`.
pub(super) type RunBatch<I, O> = Arc<
    dyn for<'a> Fn(&'a PgPool, &'a [I]) -> Pin<Box<dyn Future<Output = BatchResult<O>> + Send + 'a>>
        + Send
        + Sync,
>;

type Entry<I, O> = (I, oneshot::Sender<Result<O, StoreError>>);

/// Gathers writes of one kind into multi-row statements.
pub(super) struct Batcher<I, O> {
    queue: mpsc::UnboundedSender<Entry<I, O>>,
    /// Statements run so far.
    statements: Arc<AtomicU64>,
}

impl<I, O> Batcher<I, O>
where
    I: Send + Sync + 'static,
    O: Send + 'static,
{
    /// Starts the batcher's task, which stops with `stop`. `key` names the delivery a write
    /// changes (one per batch). A batch of writes tells `commits` of each statement it ran,
    /// under its name.
    pub(super) fn start<K>(
        pool: PgPool,
        stop: CancellationToken,
        key: fn(&I) -> K,
        run: RunBatch<I, O>,
        commits: Option<(&'static str, CommitWatch)>,
    ) -> Self
    where
        K: Hash + Eq + Send + 'static,
    {
        let (queue, arrivals) = mpsc::unbounded_channel();
        let statements = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&statements);
        let run: RunBatch<I, O> = Arc::new(move |pool, items| {
            counted.fetch_add(1, Ordering::Relaxed);
            let statement = run(pool, items);
            let commits = commits.clone();
            Box::pin(async move {
                let began = std::time::Instant::now();
                let ran = statement.await;
                if let (Some((name, watch)), Ok(_)) = (&commits, &ran) {
                    watch.committed("postgres", name, items.len(), began.elapsed());
                }
                ran
            })
        });
        tokio::spawn(stop.run_until_cancelled_owned(gather(pool, arrivals, key, run)));
        Batcher { queue, statements }
    }

    /// The statements this batcher has run.
    pub(super) fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// Runs `item` in the next batch; its answer.
    pub(super) async fn call(&self, item: I) -> Result<O, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((item, reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the ledger's batch writer has stopped".into())
}

/// Takes the writes as they arrive and starts a statement for those waiting whenever fewer
/// than [`IN_FLIGHT`] run.
async fn gather<I, O, K>(
    pool: PgPool,
    mut arrivals: mpsc::UnboundedReceiver<Entry<I, O>>,
    key: fn(&I) -> K,
    run: RunBatch<I, O>,
) where
    I: Send + Sync + 'static,
    O: Send + 'static,
    K: Hash + Eq,
{
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut waiting: VecDeque<Entry<I, O>> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match arrivals.recv().await {
                Some(entry) => waiting.push_back(entry),
                None => return,
            }
        }
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        while let Ok(entry) = arrivals.try_recv() {
            waiting.push_back(entry);
        }
        let mut batch = Vec::with_capacity(waiting.len().min(MAX_BATCH));
        let mut later = VecDeque::new();
        let mut seen = HashSet::with_capacity(batch.capacity());
        for entry in waiting.drain(..) {
            if batch.len() < MAX_BATCH && seen.insert(key(&entry.0)) {
                batch.push(entry);
            } else {
                later.push_back(entry);
            }
        }
        waiting = later;
        let pool = pool.clone();
        let run = Arc::clone(&run);
        tokio::spawn(async move {
            execute(&pool, &run, batch).await;
            drop(slot);
        });
    }
}

/// Runs one batch and answers its writes; when the statement fails as a whole, each write runs
/// again alone.
async fn execute<I, O>(pool: &PgPool, run: &RunBatch<I, O>, batch: Vec<Entry<I, O>>)
where
    I: Send + Sync + 'static,
    O: Send + 'static,
{
    let (items, replies): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
    match run(pool, &items).await {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(error) if items.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(error));
            }
        }
        Err(error) => {
            tracing::debug!(%error, writes = items.len(), "a batch of ledger writes failed: running each alone");
            for (item, reply) in items.chunks(1).zip(replies) {
                let answer = match run(pool, item).await {
                    Ok(mut answers) => answers.pop().unwrap_or_else(|| {
                        Err(StoreError::Corrupt("a write got no answer".into()))
                    }),
                    Err(error) => Err(error),
                };
                let _ = reply.send(answer);
            }
        }
    }
}
