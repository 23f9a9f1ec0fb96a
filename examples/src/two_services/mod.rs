//! Two services that exchange events through NATS JetStream, each with its
//! own SQLite file: [`orders`] decides and publishes `order.Placed` through
//! its outbox; [`warehouse`] reads it through its inbox, reserves stock (or
//! finds it short) and publishes `stock.Reserved` / `stock.OutOfStock`
//! through its own outbox, which `orders` reads through its inbox to settle
//! the order. Messages follow the CloudEvents contract of
//! [`aftermath::nats`].
//!
//! The binaries `orders` and `warehouse` run one service each
//! ([`serve_orders`], [`serve_warehouse`]); `orders demo` ([`demo::run`])
//! starts both as processes, SIGKILLs each a few times mid-flight,
//! re-publishes duplicates, a malformed message and an answer about an
//! unknown order, and checks both files: every order handled once on each
//! side, the bad messages parked with their raw bytes.

pub mod demo;
pub mod orders;
pub mod warehouse;

use std::error::Error;
use std::io::Read;
use std::time::Duration;

use aftermath::nats::{NatsInbox, NatsOutbox, WindowPolicy};
use aftermath::prelude::*;
use aftermath::reactor::{ReactorOptions, ReactorRunner};
use aftermath::store::read_all_pages;
use aftermath::worker::{Backoff, Worker};
use aftermath::{Position, StoredEvent};
use async_nats::jetstream::{self, consumer, stream};
use futures::TryStreamExt;
use uuid::Uuid;

use orders::{Order, OrderCommand, OrderEvent, OrderStatus};
use warehouse::{Stock, StockCommand, StockEvent};

/// The articles, and how many of each the warehouse starts with.
pub const SKUS: [(&str, u32); 3] = [("book", 12), ("lamp", 6), ("desk", 3)];

/// How long a killed service may take to come back (part of the outboxes'
/// retry horizon, which the streams' duplicate window must cover).
pub const RESTART_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// JetStream's memory of message ids on both streams: longer than either
/// outbox may re-publish (checked at start; a shorter one is refused).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

/// The names of one deployment's streams, subjects and consumers, all under
/// a subject prefix (the demo uses a fresh one per run).
#[derive(Debug, Clone)]
pub struct Topology {
    /// The subject prefix, e.g. `two-services.1a2b3c4d`.
    pub prefix: String,
}

impl Topology {
    /// The topology under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: prefix.into(),
        }
    }

    fn stream_name(&self, side: &str) -> String {
        let base: String = self
            .prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{base}_{side}")
    }

    /// The stream of what `orders` publishes.
    pub fn orders_stream(&self) -> String {
        self.stream_name("ORDERS")
    }

    /// The stream of what `warehouse` publishes.
    pub fn warehouse_stream(&self) -> String {
        self.stream_name("WAREHOUSE")
    }

    /// `<prefix>.orders.placed`.
    pub fn placed_subject(&self) -> String {
        format!("{}.orders.placed", self.prefix)
    }

    /// `<prefix>.warehouse.<reserved | out-of-stock>`.
    pub fn warehouse_subject(&self, what: &str) -> String {
        format!("{}.warehouse.{what}", self.prefix)
    }

    /// Creates (or updates) both streams: file storage, a day of history,
    /// the [`DUPLICATE_WINDOW`].
    pub async fn ensure_streams(&self, js: &jetstream::Context) -> Result<(), Box<dyn Error>> {
        for (name, subjects) in [
            (self.orders_stream(), format!("{}.orders.>", self.prefix)),
            (
                self.warehouse_stream(),
                format!("{}.warehouse.>", self.prefix),
            ),
        ] {
            js.create_or_update_stream(stream::Config {
                name,
                subjects: vec![subjects],
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(24 * 3600),
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }

    /// Deletes both streams.
    pub async fn delete_streams(&self, js: &jetstream::Context) -> Result<(), Box<dyn Error>> {
        js.delete_stream(self.orders_stream()).await?;
        js.delete_stream(self.warehouse_stream()).await?;
        Ok(())
    }
}

/// The durable consumer of the `orders` inbox (on the warehouse's stream).
pub const ORDERS_INBOX: &str = "orders-inbox";
/// The durable consumer of the `warehouse` inbox (on the orders' stream).
pub const WAREHOUSE_INBOX: &str = "warehouse-inbox";
const ORDERS_OUTBOX: &str = "orders-outbox";
const WAREHOUSE_OUTBOX: &str = "warehouse-outbox";

/// The id of order number `n`.
pub fn order_id(n: u32) -> String {
    format!("o-{n:03}")
}

/// Article and quantity of order number `n`.
pub fn order_line(n: u32) -> (&'static str, u32) {
    (SKUS[n as usize % SKUS.len()].0, 1 + n % 3)
}

const NAMESPACE: Uuid = Uuid::from_u128(0x9c41_7d2e_51a8_4f03_b6e2_0d17_c3a9_e845);

/// A command id that is the same on every run of the same deployment, so
/// a service restarted after a kill decides nothing twice.
fn stable_id(topology: &Topology, what: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("{}/{what}", topology.prefix).as_bytes())
}

/// Connects, retrying while the server is not up yet.
pub async fn connect(url: &str) -> Result<jetstream::Context, Box<dyn Error>> {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(url)
        .await?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(3))
        .build(client))
}

fn reactor_options() -> ReactorOptions {
    ReactorOptions::default()
        .retry_delay(Duration::from_millis(20), Duration::from_millis(500))
        .max_attempts(20)
        .call_timeout(Duration::from_secs(3))
        .poll_interval(Duration::from_millis(20))
}

async fn inbox_consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    filter: String,
) -> Result<consumer::PullConsumer, Box<dyn Error>> {
    Ok(js
        .get_stream(stream)
        .await?
        .get_or_create_consumer(
            name,
            consumer::pull::Config {
                durable_name: Some(name.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                // A killed service's unacknowledged message comes back soon.
                ack_wait: Duration::from_secs(2),
                filter_subject: filter,
                ..Default::default()
            },
        )
        .await?)
}

fn worker() -> Worker {
    Worker::new().backoff(Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    })
}

/// Every event in `store`.
pub async fn all_events(store: &SqliteStore) -> Result<Vec<StoredEvent>, Box<dyn Error>> {
    Ok(read_all_pages(store, Position::ORIGIN, None, 512)
        .try_collect()
        .await?)
}

/// Resolves when stdin closes (the demo's way to stop a service gracefully).
async fn stdin_closed() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// `orders serve <db> <nats url> <prefix> <orders>`: places orders
/// `1..=orders` (idempotently: a restart places none twice), publishes them
/// through the outbox, settles them from the warehouse's answers through the
/// inbox, prints its progress, and stops when stdin closes.
pub async fn serve_orders(
    db: &str,
    url: &str,
    topology: Topology,
    count: u32,
) -> Result<(), Box<dyn Error>> {
    init_logs();
    let store = SqliteStore::open(db).await?;
    let js = connect(url).await?;
    topology.ensure_streams(&js).await?;
    let options = reactor_options();
    let placed = topology.placed_subject();
    // ANCHOR: nats_outbox
    let outbox = NatsOutbox::new(
        ORDERS_OUTBOX,
        js.clone(),
        move |e: &Recorded<OrderEvent>| {
            matches!(e.event, OrderEvent::Placed { .. }).then(|| placed.clone())
        },
    )
    .ack_timeout(Duration::from_secs(2))
    .retry_horizon(NatsOutbox::<OrderEvent>::retry_horizon_of(
        &options,
        RESTART_ALLOWANCE,
    ))
    .window_policy(WindowPolicy::Refuse);
    let check = outbox
        .check_duplicate_window(&topology.placed_subject())
        .await?;
    println!(
        "orders: outbox may re-publish for {:?}, stream {} drops repeats for {:?}: covered",
        check.retry_horizon, check.stream, check.duplicate_window
    );
    // ANCHOR_END: nats_outbox
    let consumer = inbox_consumer(
        &js,
        &topology.warehouse_stream(),
        ORDERS_INBOX,
        format!("{}.warehouse.>", topology.prefix),
    )
    .await?;
    let repository = Repository::<Order, _>::new(store.clone());
    // ANCHOR: nats_worker
    let running = worker()
        .add_subscriber(
            ReactorRunner::new(outbox, store.clone(), store.clone(), store.clone())
                .options(options),
        )
        .add_subscriber(NatsInbox::new(
            ORDERS_INBOX,
            consumer,
            repository.clone(),
            store.clone(),
            orders::map_warehouse_message,
        ))
        .start()?;
    // ANCHOR_END: nats_worker
    println!("orders: started on {db}");
    let work = async {
        for n in 1..=count {
            let (sku, quantity) = order_line(n);
            let id = order_id(n);
            let meta = CommandMeta::with_id(stable_id(&topology, &format!("place/{id}")));
            let command = OrderCommand::Place {
                sku: sku.into(),
                quantity,
            };
            let done = repository.execute_with(&id, command, meta).await?;
            if !done.duplicate {
                println!("orders: placed {id} ({quantity} x {sku})");
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        let mut last = None;
        loop {
            let (mut reserved, mut short) = (0, 0);
            for n in 1..=count {
                match repository.load(&order_id(n)).await?.state.status {
                    OrderStatus::Reserved => reserved += 1,
                    OrderStatus::OutOfStock => short += 1,
                    _ => {}
                }
            }
            if last != Some((reserved, short)) {
                last = Some((reserved, short));
                println!(
                    "orders: {}/{count} settled ({reserved} reserved, {short} out of stock)",
                    reserved + short
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        #[allow(unreachable_code)]
        Ok::<(), Box<dyn Error>>(())
    };
    tokio::select! {
        result = work => result?,
        _ = stdin_closed() => {}
    }
    running.shutdown().await;
    println!("orders: stopped");
    Ok(())
}

/// `warehouse serve <db> <nats url> <prefix>`: stocks the [`SKUS`] once,
/// turns every placed order into a reservation through the inbox, publishes
/// the outcome through the outbox, prints its progress, and stops when
/// stdin closes.
pub async fn serve_warehouse(
    db: &str,
    url: &str,
    topology: Topology,
) -> Result<(), Box<dyn Error>> {
    init_logs();
    let store = SqliteStore::open(db).await?;
    let js = connect(url).await?;
    topology.ensure_streams(&js).await?;
    let stocks = Repository::<Stock, _>::new(store.clone());
    for (sku, quantity) in SKUS {
        let meta = CommandMeta::with_id(stable_id(&topology, &format!("restock/{sku}")));
        stocks
            .execute_with(sku, StockCommand::Restock { quantity }, meta)
            .await?;
    }
    let options = reactor_options();
    let subjects = topology.clone();
    let outbox = NatsOutbox::new(
        WAREHOUSE_OUTBOX,
        js.clone(),
        move |e: &Recorded<StockEvent>| match e.event {
            StockEvent::Reserved { .. } => Some(subjects.warehouse_subject("reserved")),
            StockEvent::OutOfStock { .. } => Some(subjects.warehouse_subject("out-of-stock")),
            StockEvent::Restocked { .. } => None,
        },
    )
    .ack_timeout(Duration::from_secs(2))
    .retry_horizon(NatsOutbox::<StockEvent>::retry_horizon_of(
        &options,
        RESTART_ALLOWANCE,
    ))
    .window_policy(WindowPolicy::Refuse);
    let check = outbox
        .check_duplicate_window(&topology.warehouse_subject("reserved"))
        .await?;
    println!(
        "warehouse: outbox may re-publish for {:?}, stream {} drops repeats for {:?}: covered",
        check.retry_horizon, check.stream, check.duplicate_window
    );
    let consumer = inbox_consumer(
        &js,
        &topology.orders_stream(),
        WAREHOUSE_INBOX,
        format!("{}.orders.>", topology.prefix),
    )
    .await?;
    let running = worker()
        .add_subscriber(
            ReactorRunner::new(outbox, store.clone(), store.clone(), store.clone())
                .options(options),
        )
        .add_subscriber(NatsInbox::new(
            WAREHOUSE_INBOX,
            consumer,
            stocks.clone(),
            store.clone(),
            warehouse::map_order_message,
        ))
        .start()?;
    println!("warehouse: started on {db}");
    let work = async {
        let mut last = None;
        loop {
            let decided = all_events(&store)
                .await?
                .iter()
                .filter(|e| e.event_type != "stock.Restocked")
                .count();
            let parked = aftermath::nats::InboxStore::parked_messages(&store, None)
                .await?
                .len();
            if last != Some((decided, parked)) {
                last = Some((decided, parked));
                println!("warehouse: {decided} reservations decided, {parked} messages parked");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        #[allow(unreachable_code)]
        Ok::<(), Box<dyn Error>>(())
    };
    tokio::select! {
        result = work => result?,
        _ = stdin_closed() => {}
    }
    running.shutdown().await;
    println!("warehouse: stopped");
    Ok(())
}

/// The entry point of the `orders` binary (and of the test suite's copy):
/// `orders serve <db> <url> <prefix> <n>` or `orders demo [<n orders> [<kill rounds>]]`.
pub fn orders_main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("serve") if args.len() == 5 => runtime.block_on(serve_orders(
            &args[1],
            &args[2],
            Topology::new(&args[3]),
            args[4].parse()?,
        )),
        None | Some("demo") => {
            let number = |i: usize, default: u32| -> Result<u32, Box<dyn Error>> {
                Ok(args.get(i).map(|a| a.parse()).transpose()?.unwrap_or(default))
            };
            let exe = std::env::current_exe()?;
            let config = demo::DemoConfig {
                warehouse_exe: exe.with_file_name(format!("warehouse{}", std::env::consts::EXE_SUFFIX)),
                orders_exe: exe,
                url: std::env::var("AFTERMATH_NATS_URL")
                    .unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
                orders: number(1, 30)?,
                kill_rounds: number(2, 2)?,
                echo: true,
            };
            let report = runtime.block_on(demo::run(&config))?;
            if report.ok() { Ok(()) } else { Err("the demo's checks failed".into()) }
        }
        _ => Err(format!(
            "usage: orders serve <db> <nats url> <prefix> <orders> | orders demo [<orders> [<kill rounds>]]; got {args:?}"
        )
        .into()),
    }
}

/// The entry point of the `warehouse` binary (and of the test suite's copy):
/// `warehouse serve <db> <url> <prefix>`.
pub fn warehouse_main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("serve") if args.len() == 4 => {
            runtime.block_on(serve_warehouse(&args[1], &args[2], Topology::new(&args[3])))
        }
        _ => Err(format!("usage: warehouse serve <db> <nats url> <prefix>; got {args:?}").into()),
    }
}
