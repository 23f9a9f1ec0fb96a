//! The single writer thread and its group commit.
//!
//! Every write of a store (appends, snapshots, [`SqliteStore::write`] jobs)
//! is a job sent to one `std::thread` that owns the only read-write
//! connection. The thread blocks for a job, then takes whatever else is
//! already queued (up to the batch limit) and runs them all in one
//! `BEGIN IMMEDIATE` transaction, each inside its own savepoint: a job that
//! fails (or panics) rolls back only its own writes and gets its own error,
//! the others commit together. Replies are sent after `COMMIT`; when the
//! commit fails, every job of the group gets that error.
//!
//! A job must not wait for the store it runs in: the writer thread is busy
//! running it, so a request to the writer (or a read, which needs tokio's
//! blocking pool that the writer thread is not part of) from inside a job
//! could never be answered. The thread is marked (a thread-local) and
//! [`on_writer_thread`] turns such a request into
//! [`StoreError::WriterReentry`] at once; [`block_on_job`] runs a job's
//! future (a SQLite projection's `apply`) and abandons it with the same error
//! when it waits longer than [`JOB_WAIT_LIMIT`] for anything else.
//!
//! [`SqliteStore::write`]: super::SqliteStore::write

use std::cell::RefCell;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{oneshot, watch};

use crate::event::Position;
use crate::store::StoreError;

/// A failure inside the writer that has no driver error of its own.
#[derive(Debug)]
struct WriterError(String);

impl std::fmt::Display for WriterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WriterError {}

fn writer_error(operation: &'static str, message: String) -> StoreError {
    StoreError::database(operation, WriterError(message))
}

thread_local! {
    /// On a writer thread: the database file it writes. `None` elsewhere.
    static WRITER_OF: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// Fails with [`StoreError::WriterReentry`] when called on a writer thread
/// (of any SQLite store): `what` could never be served from there.
pub(super) fn on_writer_thread(what: &str) -> Result<(), StoreError> {
    WRITER_OF.with(|writer| match &*writer.borrow() {
        Some(store) => Err(StoreError::WriterReentry {
            store: store.to_string(),
            cause: format!("called the store again ({what})"),
        }),
        None => Ok(()),
    })
}

/// How long a job's future may wait (return `Pending`) in total before
/// [`block_on_job`] gives it up.
pub(super) const JOB_WAIT_LIMIT: Duration = Duration::from_secs(1);

/// Wakes the writer thread that is blocked on a job's future.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a job's future to completion on the current (writer) thread.
///
/// The future is meant to run SQL through the job's connection only, so it
/// completes without waiting. If it waits (returns `Pending`) for longer than
/// `limit` in total, it is dropped and the job fails with
/// [`StoreError::WriterReentry`]: whatever it waits for may itself wait for
/// this writer, and every other write of the store waits meanwhile.
pub(super) fn block_on_job<F: Future>(future: F, limit: Duration) -> Result<F::Output, StoreError> {
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut waited = Duration::ZERO;
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return Ok(output);
        }
        if waited >= limit {
            let store = WRITER_OF
                .with(|writer| writer.borrow().as_deref().map(str::to_owned))
                .unwrap_or_else(|| "(not on a writer thread)".to_owned());
            return Err(StoreError::WriterReentry {
                store,
                cause: format!(
                    "waited {} ms for something outside its own connection (a SQLite \
                     projection's `apply` may only run SQL through its `SqliteTx`)",
                    waited.as_millis()
                ),
            });
        }
        let parked = Instant::now();
        std::thread::park_timeout(limit - waited);
        waited += parked.elapsed();
    }
}

/// One request to the writer thread.
trait Job: Send {
    /// Runs the work on the writer connection, inside the job's savepoint.
    fn run(&mut self, conn: &mut Connection) -> Result<(), StoreError>;
    /// The head of `$all` after this job, when it appended events.
    fn head(&self) -> Option<Position>;
    /// Replies once the group's `COMMIT` is done: the job's output, or the
    /// commit's error.
    fn committed(self: Box<Self>, commit: Result<(), &rusqlite::Error>);
    /// Replies with an error: the job's own, or a failure of its group.
    fn fail(self: Box<Self>, error: StoreError);
}

/// A job computing a `T` from an `I`, replying on a oneshot channel. The
/// input is dropped after the reply is sent (large append batches are not
/// freed while the caller waits).
struct Typed<I, T, F> {
    input: I,
    work: Option<F>,
    output: Option<T>,
    head: fn(&T) -> Option<Position>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<I, T, F> Job for Typed<I, T, F>
where
    I: Send,
    T: Send,
    F: FnOnce(&mut Connection, &I) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &mut Connection) -> Result<(), StoreError> {
        let work = self
            .work
            .take()
            .ok_or_else(|| writer_error("running a write job", "the job already ran".into()))?;
        self.output = Some(work(conn, &self.input)?);
        Ok(())
    }

    fn head(&self) -> Option<Position> {
        self.output.as_ref().and_then(self.head)
    }

    fn committed(self: Box<Self>, commit: Result<(), &rusqlite::Error>) {
        let Typed {
            input,
            output,
            reply,
            ..
        } = *self;
        let result = match (commit, output) {
            (Ok(()), Some(output)) => Ok(output),
            (Ok(()), None) => Err(writer_error(
                "running a write job",
                "the job committed without an output".into(),
            )),
            (Err(e), _) => Err(StoreError::database(
                "committing a group of writes",
                clone_error(e),
            )),
        };
        // The caller may have stopped waiting (its future was dropped).
        let _ = reply.send(result);
        drop(input);
    }

    fn fail(self: Box<Self>, error: StoreError) {
        let Typed { input, reply, .. } = *self;
        let _ = reply.send(Err(error));
        drop(input);
    }
}

/// `rusqlite::Error` is not `Clone`; every job of a failed group gets a copy.
fn clone_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

/// The handle to the writer thread. The thread stops when the handle (the
/// last sender of its channel) is dropped.
pub(super) struct Writer {
    jobs: mpsc::Sender<Box<dyn Job>>,
    #[cfg_attr(not(test), allow(dead_code))]
    groups: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the writer thread, which owns `conn` from now on and publishes
    /// the head of `$all` after every commit that appended events.
    /// `location` names the database in errors.
    pub(super) fn spawn(
        conn: Connection,
        location: &str,
        max_batch: usize,
        head: Arc<watch::Sender<Position>>,
    ) -> Result<Writer, StoreError> {
        let (jobs, queue) = mpsc::channel::<Box<dyn Job>>();
        let groups = Arc::new(AtomicU64::new(0));
        let counter = groups.clone();
        let location: Arc<str> = Arc::from(location);
        std::thread::Builder::new()
            .name("aftermath-sqlite-writer".into())
            .spawn(move || {
                WRITER_OF.with(|writer| *writer.borrow_mut() = Some(location));
                run(conn, queue, max_batch.max(1), &head, &counter)
            })
            .map_err(|e| StoreError::database("starting the writer thread", e))?;
        Ok(Writer { jobs, groups })
    }

    /// Runs `work` on `input` in the next group commit and returns its
    /// output once the group committed. `head` tells which head position
    /// the output represents (for appends).
    ///
    /// Fails at once with [`StoreError::WriterReentry`] on a writer thread,
    /// where the answer could never come.
    pub(super) async fn submit<I, T, F>(
        &self,
        input: I,
        head: fn(&T) -> Option<Position>,
        work: F,
    ) -> Result<T, StoreError>
    where
        I: Send + 'static,
        T: Send + 'static,
        F: FnOnce(&mut Connection, &I) -> Result<T, StoreError> + Send + 'static,
    {
        on_writer_thread("an append, a checkpoint, a lease or a `write` job")?;
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Typed {
            input,
            work: Some(work),
            output: None,
            head,
            reply,
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Closed("the SQLite writer thread has stopped".into()))?;
        answer.await.map_err(|_| {
            StoreError::Closed("the SQLite writer thread stopped before replying".into())
        })?
    }

    /// How many group transactions the writer has run.
    #[cfg(test)]
    pub(super) fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }
}

/// The writer thread's loop: one group commit per wake-up.
fn run(
    mut conn: Connection,
    queue: mpsc::Receiver<Box<dyn Job>>,
    max_batch: usize,
    head: &watch::Sender<Position>,
    groups: &AtomicU64,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch.min(1024));
    let mut done: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch.min(1024));
    // Blocks for the first job; ends when every store handle is gone.
    while let Ok(first) = queue.recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        groups.fetch_add(1, Ordering::Relaxed);
        if let Some(new_head) = commit_group(&mut conn, &mut batch, &mut done) {
            head.send_if_modified(|current| {
                let moved = new_head > *current;
                if moved {
                    *current = new_head;
                }
                moved
            });
        }
    }
    drop(conn);
}

/// Runs one group in one transaction; returns the head after the commit if
/// any job of the group appended events.
///
/// With several jobs each runs in a savepoint; a group of one needs none:
/// its failure rolls back the whole (otherwise empty) transaction.
fn commit_group(
    conn: &mut Connection,
    batch: &mut Vec<Box<dyn Job>>,
    done: &mut Vec<Box<dyn Job>>,
) -> Option<Position> {
    let savepoints = batch.len() > 1;
    let mut in_transaction = false;
    let mut head: Option<Position> = None;
    for mut job in batch.drain(..) {
        if !in_transaction {
            if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
                job.fail(StoreError::database("beginning a write transaction", e));
                continue;
            }
            in_transaction = true;
        }
        if savepoints && let Err(e) = exec(conn, "SAVEPOINT aftermath_job") {
            if conn.is_autocommit() {
                abort_group(done);
                in_transaction = false;
                head = None;
            }
            job.fail(StoreError::database("starting a savepoint", e));
            continue;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| job.run(conn))).unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Err(writer_error(
                "running a write job",
                format!("the write job panicked: {message}"),
            ))
        });
        if conn.is_autocommit() {
            // The transaction is gone: the job ended it, or SQLite rolled it
            // back after a severe error. Nothing of this group is committed.
            abort_group(done);
            in_transaction = false;
            head = None;
            job.fail(outcome.err().unwrap_or_else(|| {
                writer_error(
                    "running a write job",
                    "the job ended the writer's transaction (jobs must not BEGIN, COMMIT or ROLLBACK)"
                        .into(),
                )
            }));
            continue;
        }
        let outcome = match outcome {
            Ok(()) if savepoints => exec(conn, "RELEASE aftermath_job")
                .map_err(|e| StoreError::database("releasing a savepoint", e)),
            other => other,
        };
        let error = match outcome {
            Ok(()) => {
                head = head.max(job.head());
                done.push(job);
                continue;
            }
            Err(error) => error,
        };
        // Undo the failed job's writes, then tell its caller.
        let undone = if savepoints {
            exec(conn, "ROLLBACK TO aftermath_job")
                .and_then(|()| exec(conn, "RELEASE aftermath_job"))
        } else {
            in_transaction = false;
            exec(conn, "ROLLBACK")
        };
        if let Err(e) = undone {
            // The failed job's writes cannot be undone alone: give up the
            // whole group rather than commit them.
            if !conn.is_autocommit() {
                let _ = exec(conn, "ROLLBACK");
            }
            for job in done.drain(..) {
                job.fail(StoreError::database(
                    "rolling back a failed write",
                    clone_error(&e),
                ));
            }
            in_transaction = false;
            head = None;
        }
        job.fail(error);
    }
    if !in_transaction {
        return None;
    }
    match exec(conn, "COMMIT") {
        Ok(()) => {
            for job in done.drain(..) {
                job.committed(Ok(()));
            }
            head
        }
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = exec(conn, "ROLLBACK");
            }
            for job in done.drain(..) {
                job.committed(Err(&e));
            }
            None
        }
    }
}

/// Fails the jobs that already ran in a transaction that was lost.
fn abort_group(done: &mut Vec<Box<dyn Job>>) {
    for job in done.drain(..) {
        job.fail(writer_error(
            "running a group of writes",
            "the group's transaction was rolled back by another job's failure; nothing was written"
                .into(),
        ));
    }
}

/// Executes a statement without parameters through the statement cache.
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}
