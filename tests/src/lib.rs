//! Integration tests for aftermath: the backend conformance suite (written
//! once, generic over the store, instantiated per backend with
//! [`conformance_tests!`]), the deadline store suite (the same way, with
//! [`deadline_store_tests!`]), a shared test domain, and helpers.

pub mod child;
pub mod conformance;
pub mod deadlines;
pub mod domain;
pub mod groups;
pub mod nats;
pub mod pg_cluster;
pub mod postgres;
pub mod process;
pub mod projections;
pub mod reactors;

use std::any::Any;

use aftermath::{EventData, EventStore, Metadata, Upcasters};
use uuid::Uuid;

/// A fresh, empty store and whatever keeps it alive (a temp dir, a schema).
pub struct Fresh<S> {
    /// The store under test.
    pub store: S,
    /// Dropped after the test: removes temp files and the like.
    pub guard: Box<dyn Any + Send>,
}

/// A backend the conformance suite runs against.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The store type.
    type Store: EventStore + Clone;
    /// Name printed in skip messages.
    const NAME: &'static str;
    /// A fresh empty store whose reads apply `upcasters`, or the reason the
    /// backend cannot run here (for example its URL variable is not set).
    async fn open(upcasters: Upcasters) -> Result<Fresh<Self::Store>, String>;
}

/// Prints a skip notice on the process's real stderr. The test harness
/// captures `eprintln!` of passing tests, so a notice printed that way would
/// never reach the person running `cargo test`.
pub fn report_skip(message: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

/// `skip_notice!("SKIPPED suite::test: reason")`: see [`report_skip`].
#[macro_export]
macro_rules! skip_notice {
    ($($arg:tt)*) => {
        $crate::report_skip(format_args!($($arg)*))
    };
}

/// Opens a fresh store or prints why the test is skipped.
pub async fn open_or_skip<B: Backend>(test: &str, upcasters: Upcasters) -> Option<Fresh<B::Store>> {
    match B::open(upcasters).await {
        Ok(fresh) => Some(fresh),
        Err(reason) => {
            report_skip(format_args!("SKIPPED {}::{test}: {reason}", B::NAME));
            None
        }
    }
}

/// A raw event of `event_type` with a JSON `payload` and a fresh id.
pub fn raw(event_type: &str, payload: &str) -> EventData {
    let id = Uuid::now_v7();
    EventData {
        id,
        event_type: event_type.to_owned(),
        payload: payload.as_bytes().to_vec(),
        metadata: Metadata::caused_by(id),
    }
}

/// `n` raw "account.Deposited" events with amounts `start..start + n`.
pub fn deposits(start: u64, n: u64) -> Vec<EventData> {
    (start..start + n)
        .map(|i| raw("account.Deposited", &format!(r#"{{"amount":{i}}}"#)))
        .collect()
}

/// Instantiates every conformance test for a [`Backend`] as `#[tokio::test]`s.
#[macro_export]
macro_rules! conformance_tests {
    ($backend:ty) => {
        $crate::conformance_tests!(@each $backend;
            expected_version_cases,
            empty_batch_checks_version,
            atomic_batch_on_duplicate_in_batch,
            atomic_batch_on_id_stored_elsewhere,
            idempotent_retry_returns_first_result,
            id_reuse_elsewhere_is_an_error,
            invalid_stream_names,
            all_order_under_concurrent_writers,
            filtered_reads,
            filtered_reads_of_many_types,
            metadata_and_trace_context_round_trip,
            stream_reads_both_directions,
            large_stream_paged,
            find_head_version_and_watch,
            snapshots_never_go_back,
            undecodable_payload_is_typed_error,
            upcasters_apply_on_every_read_path,
            repository_execute_and_reject,
            repository_conflicts_are_retried,
            repository_command_id_is_idempotent,
            repository_resend_after_the_stream_moved_never_executes_twice,
            repository_concurrent_copies_of_a_command,
            snapshots_give_same_state,
            stale_snapshot_is_ignored,
            partitioned_reads,
            read_correlation_across_streams,
            each_subscriber_receives_only_its_own_events,
            unqualified_names_of_old_stores_still_load,
        );
    };
    (@each $backend:ty; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                $crate::conformance::$name::<$backend>().await;
            }
        )*
    };
}
