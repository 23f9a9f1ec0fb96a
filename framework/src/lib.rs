//! # aftermath
//!
//! Event sourcing for Rust that separates **decisions** from **side effects**.
//!
//! An [`Aggregate`] only decides, purely: `decide(&self, command) -> events`.
//! Its decision is stored as events in an [`EventStore`] with optimistic
//! concurrency and idempotent retries. Everything that follows (read models,
//! business processes, calls to the outside world) happens afterwards, in
//! subscribers that read the log from a saved checkpoint.
//!
//! The guide in the repository's `docs/` (an mdBook) teaches the idea from
//! the start: why two-phase commit fails, and how the outbox, the inbox,
//! at-least-once effects with idempotency keys and sagas replace it. Start
//! with [`prelude`]; the extension points are [`Aggregate`],
//! [`projection::Projection`], [`reactor::Reactor`] and
//! [`process::ProcessManager`], run by a [`Worker`] (on one [`Backend`]
//! with [`Worker::on`]).
//!
//! ```
//! use aftermath::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
//! #[event(prefix = "counter")]
//! enum CounterEvent {
//!     Incremented { by: u32 },
//! }
//!
//! #[derive(Default)]
//! struct Counter {
//!     value: u32,
//! }
//!
//! #[derive(Debug, PartialEq, thiserror::Error)]
//! #[error("counter would overflow")]
//! struct Overflow;
//!
//! impl Aggregate for Counter {
//!     const CATEGORY: &'static str = "counter";
//!     type Command = u32;
//!     type Event = CounterEvent;
//!     type Error = Overflow;
//!
//!     fn decide(&self, by: u32) -> Result<Vec<CounterEvent>, Overflow> {
//!         self.value.checked_add(by).ok_or(Overflow)?;
//!         Ok(vec![CounterEvent::Incremented { by }])
//!     }
//!
//!     fn apply(&mut self, event: &CounterEvent) {
//!         match event {
//!             CounterEvent::Incremented { by } => self.value += by,
//!         }
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let counters = Repository::<Counter, _>::new(MemoryStore::new());
//! let done = counters.execute("c-1", 5).await.unwrap();
//! assert_eq!(done.state.value, 5);
//! assert_eq!(done.version, 1);
//! # });
//! ```

#![warn(missing_docs)]

// Lets `#[derive(Event)]` (which names `::aftermath`) work inside this crate.
extern crate self as aftermath;

pub mod admin;
pub mod aggregate;
pub mod event;
#[cfg(feature = "nats")]
pub mod nats;
pub mod process;
pub mod projection;
pub mod reactor;
pub mod store;
pub mod subscription;
pub mod testing;
pub mod trace;
pub mod upcast;
pub mod worker;

pub use aftermath_derive::{Event, EventUnion};
pub use aggregate::{
    Aggregate, COMMAND_ACCEPTED, CommandMeta, ExecuteError, Executed, Loaded, Repository,
};
pub use event::{
    DecodeError, EncodeError, Event, EventData, Metadata, PayloadError, Position, Recorded,
    StoredEvent,
};
#[doc(hidden)]
pub mod __private {
    //! Support code for `#[derive(Event)]`; not a public API.
    pub use crate::codec::{
        collision_message, concat_types, decode_variant, encode_variant, union_collision,
    };
    pub use serde_json;
}
mod codec;

#[cfg(feature = "kurrentdb")]
pub use store::kurrentdb::{KurrentOptions, KurrentStore};
pub use store::memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use store::postgres::{Blocker, HeldBack, PostgresOptions, PostgresStore};
#[cfg(feature = "sqlite")]
pub use store::sqlite::{SqliteOptions, SqliteStore, Synchronous};
pub use store::{AppendResult, Direction, EventStore, ExpectedVersion, Snapshot, StoreError};
pub use upcast::Upcasters;
pub use worker::{Backend, Worker};

/// Everything an application usually needs, in one import: the decision
/// side (aggregates, repositories, stores), the three kinds of subscribers
/// with their runners, the worker, and what a projection needs to write SQL
/// on its backend (the transaction types, `rusqlite`, and for PostgreSQL
/// `pg_query`, `AssertSqlSafe` and the `Row` trait's methods).
pub mod prelude {
    pub use crate::aggregate::{Aggregate, CommandMeta, ExecuteError, Executed, Repository};
    pub use crate::event::{Event, Metadata, Position, Recorded};
    pub use crate::process::{Input, Outputs, ProcessManager, ProcessRunner, Route};
    pub use crate::projection::{
        HandlerError, Projection, ProjectionOptions, ProjectionRunner, ReadModelDb,
    };
    pub use crate::reactor::{EffectContext, ReactError, Reactor, ReactorRunner};
    pub use crate::store::memory::MemoryStore;
    #[cfg(feature = "postgres")]
    pub use crate::store::postgres::sqlx_core::{
        query::query as pg_query, row::Row as _, sql_str::AssertSqlSafe,
    };
    #[cfg(feature = "postgres")]
    pub use crate::store::postgres::{PgTx, PostgresStore};
    #[cfg(feature = "sqlite")]
    pub use crate::store::sqlite::{SqliteStore, SqliteTx, rusqlite};
    pub use crate::store::{EventStore, ExpectedVersion};
    pub use crate::subscription::Partition;
    pub use crate::worker::{
        Backend, BackendWorker, Partitioned, RunningWorker, SubscriberState, Worker,
    };
    pub use aftermath_derive::{Event, EventUnion};
    /// `#[async_trait]`, for implementing [`Reactor`] (and the store traits).
    pub use async_trait::async_trait;
}
