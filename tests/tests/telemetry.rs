//! Traces: one trace from the request that placed an order through the
//! saga, the commands it sends, the reactor's effect and the projection,
//! exported to an in-memory OpenTelemetry exporter; and across a SIGKILL of
//! the worker, because the trace context is stored with every event.
//!
//! The tests of this binary share one global `tracing` subscriber (the
//! OpenTelemetry layer over the in-memory exporter) and run one at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;
use std::time::Duration;

use aftermath::process::{ProcessOptions, ProcessRunner};
use aftermath::projection::{HandlerError, Projection, ProjectionRunner};
use aftermath::reactor::ReactorRunner;
use aftermath::store::sqlite::SqliteTx;
use aftermath::trace::TraceContext;
use aftermath::{CommandMeta, EventStore, Recorded, Repository, SqliteStore, StoredEvent};
use aftermath_examples::fulfillment::aggregates::OrderStatus;
use aftermath_examples::fulfillment::reactors::{CustomerMail, Mailbox};
use aftermath_examples::fulfillment::*;
use aftermath_tests::child::Child;
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use uuid::Uuid;

struct Telemetry {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
}

/// The process-wide subscriber: every span goes to the in-memory exporter.
fn telemetry() -> &'static Telemetry {
    static T: OnceLock<Telemetry> = OnceLock::new();
    T.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("telemetry-test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        Telemetry { exporter, provider }
    })
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spans() -> Vec<SpanData> {
    let t = telemetry();
    t.provider.force_flush().expect("flush");
    t.exporter.get_finished_spans().expect("spans")
}

/// Order statuses as a read model (a SQL projection, applied in SQLite
/// transactions on the store's writer thread).
struct Statuses;

impl Projection for Statuses {
    type Event = OrderEvent;
    type Db = SqliteStore;

    fn name(&self) -> &str {
        "order-statuses"
    }

    async fn setup(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS order_status (id TEXT PRIMARY KEY, status TEXT NOT NULL)",
        )?;
        Ok(())
    }

    async fn reset(&self, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        tx.execute_batch("DELETE FROM order_status")?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut SqliteTx,
        event: &Recorded<OrderEvent>,
    ) -> Result<(), HandlerError> {
        let (id, status) = match &event.event {
            OrderEvent::Placed { order, .. } => (order, "placed"),
            OrderEvent::Confirmed { order, .. } => (order, "confirmed"),
            OrderEvent::Cancelled { order, .. } => (order, "cancelled"),
        };
        tx.prepare_cached("INSERT INTO order_status (id, status) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET status = excluded.status")?
            .execute((id, status))?;
        Ok(())
    }
}

fn place(order: &str, card: &str) -> OrderCommand {
    OrderCommand::Place {
        order: order.into(),
        customer: format!("{order}@example.com"),
        sku: "book-42".into(),
        quantity: 2,
        amount: 3_998,
        card: card.into(),
        address: "221B Baker Street".into(),
    }
}

async fn restock(store: &SqliteStore) {
    Repository::<Inventory, _>::new(store.clone())
        .execute_with(
            "book-42",
            InventoryCommand::Restock {
                sku: "book-42".into(),
                quantity: 10,
            },
            CommandMeta::with_id(Uuid::new_v5(&Uuid::NAMESPACE_OID, b"restock")),
        )
        .await
        .expect("restock");
}

/// Runs the saga, the mail reactor and the projection until the order is
/// cancelled and nothing moves any more; returns the mails sent.
async fn run_to_quiescence(store: &SqliteStore, order: &str) -> Mailbox {
    let saga = ProcessRunner::new(
        Fulfillment,
        store.clone(),
        command_bus(store),
        store.clone(),
        store.clone(),
    )
    .options(ProcessOptions::default());
    let mailbox = Mailbox::new();
    let mail = ReactorRunner::new(
        CustomerMail {
            mailbox: mailbox.clone(),
        },
        store.clone(),
        store.clone(),
        store.clone(),
    );
    let statuses = ProjectionRunner::new(Statuses, store.clone(), store.clone());
    let orders = Repository::<Order, _>::new(store.clone());
    let mut last_head = None;
    for _ in 0..50 {
        saga.catch_up().await.expect("saga");
        mail.catch_up().await.expect("mail");
        statuses.catch_up().await.expect("projection");
        let head = store.head().await.expect("head");
        let cancelled =
            orders.load(order).await.expect("load").state.status == OrderStatus::Cancelled;
        if cancelled && last_head == Some(head) {
            return mailbox;
        }
        last_head = Some(head);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("order {order} did not settle");
}

async fn correlation_events(store: &SqliteStore, correlation: Uuid) -> Vec<StoredEvent> {
    store
        .read_correlation(correlation, aftermath::Position::ORIGIN, 1000)
        .await
        .expect("read the conversation")
}

fn stored_trace(e: &StoredEvent) -> Option<u128> {
    e.metadata.trace.as_ref().map(|t| t.trace_id())
}

fn named<'a>(spans: &'a [SpanData], trace: TraceId, name: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace && s.name.starts_with(name))
        .collect()
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// A command executed inside a request's span, then the saga (declined
/// card: stock reserved, charge rejected, stock released as compensation,
/// order cancelled), the mail reactor and a projection, run to quiescence:
/// every event of the conversation carries the request's trace id, every
/// span that handled one is in that trace, the saga's commands are children
/// of the handling of the records that sent them, and each effect and
/// projection apply is the child of the span that recorded its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_request_to_the_effects() {
    let t = telemetry();
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("traced.db"))
        .await
        .unwrap();
    restock(&store).await;
    // Only what follows the request counts (the restock is a trace of its own).
    t.exporter.reset();

    let request = tracing::info_span!("POST /orders");
    let correlation = Uuid::now_v7();
    let order = "T-1";
    Repository::<Order, _>::new(store.clone())
        .execute_with(
            order,
            place(order, "declined"),
            CommandMeta::with_id(Uuid::now_v7()).correlation(correlation),
        )
        .instrument(request)
        .await
        .expect("place");
    let mailbox = run_to_quiescence(&store, order).await;
    assert_eq!(mailbox.sent().len(), 1, "the cancellation mail");

    let spans = spans();
    let root = spans
        .iter()
        .find(|s| s.name == "POST /orders")
        .expect("the request's span");
    let trace = root.span_context.trace_id();
    let trace_u128 = u128::from_be_bytes(trace.to_bytes());

    // Every event of the conversation carries the request's trace.
    let events = correlation_events(&store, correlation).await;
    assert!(events.len() >= 8, "{} events", events.len());
    for e in &events {
        assert_eq!(
            stored_trace(e),
            Some(trace_u128),
            "{} {} has no/another trace",
            e.stream,
            e.event_type
        );
    }

    // The handling spans of those events are all in the trace.
    let by_id: HashMap<SpanId, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let handles = named(&spans, trace, "process ");
    let effects = named(&spans, trace, "effect customer-mail");
    let sends = named(&spans, trace, "send ");
    let executes = named(&spans, trace, "execute ");
    assert!(handles.len() >= 6, "handle spans: {}", handles.len());
    assert_eq!(
        effects.len(),
        2,
        "one effect attempt per order event (placed, cancelled)"
    );
    assert!(
        sends.len() >= 3,
        "reserve, charge, release, cancel: {}",
        sends.len()
    );
    let mut stray: Vec<String> = spans
        .iter()
        .filter(|s| {
            (s.name.starts_with("effect ")
                || s.name.starts_with("send ")
                || s.name.starts_with("execute "))
                && s.span_context.trace_id() != trace
        })
        .map(|s| s.name.to_string())
        .collect();
    stray.sort();
    assert!(stray.is_empty(), "spans outside the trace: {stray:?}");

    // The first command is the request's child; each sent command's
    // execution is a child of its dispatch, and each dispatch a child of
    // the handling of the record that sent it.
    let first = executes
        .iter()
        .find(|s| s.parent_span_id == root.span_context.span_id())
        .expect("the order's execute span under the request");
    assert_eq!(
        attr(first, "aftermath.outcome").as_deref(),
        Some("executed")
    );
    for send in &sends {
        let parent = by_id
            .get(&send.parent_span_id)
            .expect("dispatch has a parent");
        assert!(
            parent.name.starts_with("process "),
            "dispatch under {}",
            parent.name
        );
        assert!(
            executes
                .iter()
                .any(|e| e.parent_span_id == send.span_context.span_id()),
            "the command of {} runs under it",
            send.name
        );
    }
    // A compensation and a rejection were in this trace.
    let targets: HashSet<String> = sends
        .iter()
        .filter_map(|s| attr(s, "aftermath.target"))
        .collect();
    assert!(
        targets.contains("payment") && targets.contains("inventory"),
        "{targets:?}"
    );

    // Effects and projection applies: the parent is the span whose context
    // is stored with the event (the execute span that appended it).
    let stored_parents: BTreeMap<String, u64> = events
        .iter()
        .map(|e| {
            (
                e.id.to_string(),
                e.metadata.trace.as_ref().unwrap().span_id(),
            )
        })
        .collect();
    for span in effects
        .iter()
        .chain(named(&spans, trace, "process order.").iter())
    {
        let id = attr(span, "messaging.message.id").expect("message id");
        let parent = stored_parents
            .get(&id)
            .expect("an event of the conversation");
        assert_eq!(
            u64::from_be_bytes(span.parent_span_id.to_bytes()),
            *parent,
            "{} of {id} is not under the span that recorded it",
            span.name
        );
    }
    let applies = handles
        .iter()
        .filter(|s| attr(s, "messaging.consumer.group.name").as_deref() == Some("order-statuses"))
        .count();
    assert_eq!(
        applies, 2,
        "the projection applied Placed and Cancelled in the trace"
    );
}

/// The worker is SIGKILLed after the saga started; another process takes
/// over and finishes the saga, the effect and the projection. Its spans
/// continue the trace the first process's request started, because the
/// context is stored with the events, not held in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_joins_across_a_sigkill() {
    let t = telemetry();
    let _serial = SERIAL.lock().await;
    t.exporter.reset();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("killed.db");
    let trace = TraceContext::new(
        0x5eed_0000_0000_0000_0000_0000_0000_0042,
        0x00f0_67aa_0ba9_02b7,
        true,
    )
    .unwrap();
    let order = "K-1";
    let mut worker = Child::spawn(
        env!("CARGO_BIN_EXE_traced_worker"),
        "traced_worker",
        &[db.to_str().unwrap(), order, &trace.traceparent()],
    );
    worker.expect("placed", Duration::from_secs(30));
    worker.expect("saga:", Duration::from_secs(30));
    worker.kill();

    let store = SqliteStore::open(&db).await.unwrap();
    let mailbox = run_to_quiescence(&store, order).await;
    assert_eq!(
        mailbox.sent().len(),
        1,
        "the cancellation mail, sent after the takeover"
    );

    let placed = store
        .read_stream(
            &format!("order-{order}"),
            1,
            aftermath::Direction::Forward,
            1,
        )
        .await
        .unwrap();
    let correlation = placed[0].metadata.correlation_id;
    for e in correlation_events(&store, correlation).await {
        assert_eq!(
            stored_trace(&e),
            Some(trace.trace_id()),
            "{} {}",
            e.stream,
            e.event_type
        );
    }
    let spans = spans();
    let ours = TraceId::from_bytes(trace.trace_id().to_be_bytes());
    let effects = named(&spans, ours, "effect customer-mail");
    assert!(
        !effects.is_empty(),
        "the takeover's effects continue the trace"
    );
    let projection = spans
        .iter()
        .filter(|s| {
            attr(s, "messaging.consumer.group.name").as_deref() == Some("order-statuses")
                && attr(s, "messaging.message.id").is_some()
        })
        .collect::<Vec<_>>();
    assert_eq!(
        projection.len(),
        2,
        "the projection applied Placed and Cancelled"
    );
    assert!(
        projection.iter().all(|s| s.span_context.trace_id() == ours),
        "every projection apply after the takeover is in the original trace"
    );
}
