//! The saga rows: the fulfillment flow (place, reserve, charge, request
//! shipping + deadline, carrier confirms, commit, confirm, complete) driven
//! by the `Fulfillment` process manager, beside the same seven commands
//! executed by hand per order on the same kind of store (the baseline:
//! what the flow costs without a process manager). The partitioned row runs
//! the saga split 16 ways (`ProcessRunner::partition`) in one `Worker`. The
//! helpers here are shared with the scale-out rows (`scaleout.rs`).

use std::time::{Duration, Instant};

use aftermath::process::testkit::Harness;
use aftermath::process::{MemoryDeadlines, ProcessOptions, ProcessRunner};
use aftermath::reactor::{
    EffectContext, MemoryJournal, ReactError, Reactor, ReactorOptions, ReactorRunner,
};
use aftermath::subscription::MemoryCheckpoints;
use aftermath::worker::{Backend, Worker};
use aftermath::{EventStore, MemoryStore, Recorded, Repository, SqliteStore};
use aftermath_benches::TempDb;
use aftermath_examples::fulfillment::*;
use futures::StreamExt;

use super::{Plan, Result, header, row};

/// Partitions of the partitioned saga rows.
pub(crate) const PARTITIONS: u32 = 16;

/// Orders in flight at once for the baseline, lanes for the saga.
pub(crate) const CONCURRENCY: usize = 16;

/// Confirms every requested shipment at once (the carrier's webhook).
#[derive(Clone)]
pub(crate) struct AutoCarrier<S>(pub(crate) Repository<Shipping, S>);

#[async_trait::async_trait]
impl<S: EventStore + Clone> Reactor for AutoCarrier<S> {
    type Event = ShippingEvent;
    fn name(&self) -> &str {
        "auto-carrier"
    }
    async fn react(
        &self,
        e: &Recorded<ShippingEvent>,
        _: &EffectContext,
    ) -> std::result::Result<(), ReactError> {
        if let ShippingEvent::Requested { order, .. } = &e.event {
            self.0
                .execute(order, ShippingCommand::Confirm)
                .await
                .map_err(ReactError::retry)?;
        }
        Ok(())
    }
}

pub(crate) fn place(order: &str) -> OrderCommand {
    OrderCommand::Place {
        order: order.to_owned(),
        customer: "c@example.com".into(),
        sku: sku(order),
        quantity: 1,
        amount: 100,
        card: "visa".into(),
        address: "1 Main St".into(),
    }
}

/// Four orders per SKU: short inventory streams, so the rows measure the
/// flow, not folding one hot stream over and over (no snapshots here).
fn sku(order: &str) -> String {
    let i: usize = order
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    format!("sku-{}", i / 4)
}

pub(crate) async fn restock<S: EventStore + Clone>(store: &S, orders: &[String]) -> Result<()> {
    let inventory = Repository::<Inventory, _>::new(store.clone());
    let mut skus: Vec<String> = orders.iter().map(|o| sku(o)).collect();
    skus.sort();
    skus.dedup();
    for s in skus {
        inventory
            .execute(
                &s,
                InventoryCommand::Restock {
                    sku: s.clone(),
                    quantity: orders.len() as u32,
                },
            )
            .await?;
    }
    Ok(())
}

/// The saga: place every order, then run the saga and the carrier until
/// nothing moves. Returns the elapsed time; checks every order confirmed.
async fn saga_run<S, D, C>(
    store: S,
    deadlines: D,
    checkpoints: C,
    journal: impl aftermath::reactor::EffectJournal,
    carrier_checkpoints: impl aftermath::subscription::CheckpointStore,
    orders: &[String],
) -> Result<Duration>
where
    S: EventStore + Clone,
    D: aftermath::process::DeadlineStore,
    C: aftermath::subscription::CheckpointStore,
{
    restock(&store, orders).await?;
    let saga = ProcessRunner::new(
        Fulfillment,
        store.clone(),
        command_bus(&store),
        deadlines,
        checkpoints,
    )
    .options(
        ProcessOptions::default()
            .concurrency(CONCURRENCY)
            .batch_size(500),
    );
    let carrier = ReactorRunner::new(
        AutoCarrier(Repository::new(store.clone())),
        store.clone(),
        journal,
        carrier_checkpoints,
    )
    .options(
        ReactorOptions::default()
            .concurrency(CONCURRENCY)
            .batch_size(500),
    );
    let harness = Harness::new(store.clone()).with(saga).with(carrier);
    let started = Instant::now();
    place_all(&store, orders).await?;
    harness.settle().await?;
    let elapsed = started.elapsed();
    check_confirmed(&store, orders).await?;
    Ok(elapsed)
}

/// Places every order, `CONCURRENCY` at a time.
pub(crate) async fn place_all<S: EventStore + Clone>(store: &S, orders: &[String]) -> Result<()> {
    let repo = Repository::<Order, _>::new(store.clone());
    futures::stream::iter(orders.iter())
        .map(|o| {
            let repo = repo.clone();
            async move { repo.execute(o, place(o)).await.map(|_| ()) }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<std::result::Result<Vec<()>, _>>()?;
    Ok(())
}

/// Checks that the first orders ended confirmed.
pub(crate) async fn check_confirmed<S: EventStore + Clone>(
    store: &S,
    orders: &[String],
) -> Result<()> {
    let repo = Repository::<Order, _>::new(store.clone());
    for o in orders.iter().take(20) {
        let status = repo.load(o).await?.state.status;
        if status != aggregates::OrderStatus::Confirmed {
            return Err(format!("order {o} ended {status:?}").into());
        }
    }
    Ok(())
}

/// Counts `order.Confirmed` events as they are appended.
#[derive(Default)]
pub(crate) struct Confirmations {
    after: aftermath::Position,
    count: u64,
}

impl Confirmations {
    /// Reads the confirmations appended since the last call; returns how
    /// many there are in all.
    pub(crate) async fn poll<S: EventStore>(&mut self, store: &S) -> Result<u64> {
        loop {
            let page = store
                .read_all(self.after, Some(&["order.Confirmed"]), 1000)
                .await?;
            let Some(last) = page.last() else {
                return Ok(self.count);
            };
            self.after = last.position;
            self.count += page.len() as u64;
        }
    }

    /// Waits (polling every 10 ms) until `n` orders are confirmed.
    pub(crate) async fn wait<S: EventStore>(
        &mut self,
        store: &S,
        n: u64,
        timeout: Duration,
    ) -> Result<()> {
        let began = Instant::now();
        while self.poll(store).await? < n {
            if began.elapsed() > timeout {
                return Err(format!(
                    "only {} of {n} orders confirmed after {timeout:?}",
                    self.count
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// The saga partitioned `PARTITIONS` ways, every partition in this
/// process (a `Worker` without leases runs them all), with the carrier:
/// place every order, wait until every one is confirmed.
async fn partitioned_run<S: Backend>(store: S, orders: &[String]) -> Result<Duration> {
    restock(&store, orders).await?;
    let worker = Worker::on(store.clone())
        .partitioned_process(
            Fulfillment,
            command_bus(&store),
            PARTITIONS,
            ProcessOptions::default()
                .concurrency(CONCURRENCY)
                .batch_size(500),
        )
        .reactor_with(
            AutoCarrier(Repository::new(store.clone())),
            ReactorOptions::default()
                .concurrency(CONCURRENCY)
                .batch_size(500),
        )
        .start()?;
    let started = Instant::now();
    let outcome = async {
        place_all(&store, orders).await?;
        Confirmations::default()
            .wait(&store, orders.len() as u64, Duration::from_secs(600))
            .await
    }
    .await;
    let elapsed = started.elapsed();
    worker.shutdown().await;
    outcome?;
    check_confirmed(&store, orders).await?;
    Ok(elapsed)
}

/// The baseline: the same seven commands per order, by hand.
pub(crate) async fn by_hand<S: EventStore + Clone>(
    store: S,
    orders: &[String],
) -> Result<Duration> {
    restock(&store, orders).await?;
    // Four orders share an SKU, sixteen run at once: retry version races.
    let order_repo = Repository::<Order, _>::new(store.clone());
    let inventory = Repository::<Inventory, _>::new(store.clone()).max_attempts(1000);
    let payment = Repository::<Payment, _>::new(store.clone());
    let shipping = Repository::<Shipping, _>::new(store.clone());
    let started = Instant::now();
    futures::stream::iter(orders.iter())
        .map(|o| {
            let (order_repo, inventory, payment, shipping) = (
                order_repo.clone(),
                inventory.clone(),
                payment.clone(),
                shipping.clone(),
            );
            async move {
                order_repo.execute(o, place(o)).await?;
                inventory
                    .execute(
                        &sku(o),
                        InventoryCommand::Reserve {
                            sku: sku(o),
                            order: o.clone(),
                            quantity: 1,
                        },
                    )
                    .await?;
                payment
                    .execute(
                        o,
                        PaymentCommand::Charge {
                            order: o.clone(),
                            amount: 100,
                            card: "visa".into(),
                        },
                    )
                    .await?;
                shipping
                    .execute(
                        o,
                        ShippingCommand::Request {
                            order: o.clone(),
                            address: "1 Main St".into(),
                        },
                    )
                    .await?;
                shipping.execute(o, ShippingCommand::Confirm).await?;
                inventory
                    .execute(&sku(o), InventoryCommand::Commit { order: o.clone() })
                    .await?;
                order_repo.execute(o, OrderCommand::Confirm).await?;
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<std::result::Result<Vec<()>, _>>()?;
    Ok(started.elapsed())
}

pub(crate) fn orders(n: usize, run: &str) -> Vec<String> {
    (0..n).map(|i| format!("{run}-{i}")).collect()
}

pub(crate) fn run(rt: &tokio::runtime::Runtime, plan: &Plan) -> Result<()> {
    let n = plan.sagas;
    println!();
    println!(
        "sagas: the fulfillment flow, {n} orders, 7 commands each; baseline = the same commands by hand"
    );
    header();
    rt.block_on(async {
        let memory_saga = saga_run(
            MemoryStore::new(),
            MemoryDeadlines::new(),
            MemoryCheckpoints::new(),
            MemoryJournal::new(),
            MemoryCheckpoints::new(),
            &orders(n, "m"),
        )
        .await?;
        let memory_hand = by_hand(MemoryStore::new(), &orders(n, "mh")).await?;
        let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        row(
            "memory: sagas completed",
            "sagas/s",
            rate(memory_saga),
            Some(rate(memory_hand)),
            "framework cost alone (no I/O)",
        );
        if std::env::var("AFTERMATH_BENCH_ONLY_SAGAS").as_deref() == Ok("memory") {
            return Ok(());
        }
        let db = TempDb::new("sagas");
        let store = SqliteStore::open(db.path()).await?;
        let sqlite_saga = saga_run(
            store.clone(),
            store.clone(),
            store.clone(),
            store.clone(),
            store,
            &orders(n, "s"),
        )
        .await?;
        let db2 = TempDb::new("sagas-hand");
        let sqlite_hand = by_hand(SqliteStore::open(db2.path()).await?, &orders(n, "sh")).await?;
        row(
            "sqlite: sagas completed",
            "sagas/s",
            rate(sqlite_saga),
            Some(rate(sqlite_hand)),
            &format!(
                "{:.0}% of the saga's time is the store (1 - memory/sqlite)",
                100.0 * (1.0 - memory_saga.as_secs_f64() / sqlite_saga.as_secs_f64())
            ),
        );
        let db3 = TempDb::new("sagas-partitioned");
        let partitioned = partitioned_run(SqliteStore::open(db3.path()).await?, &orders(n, "sp")).await?;
        row(
            &format!("sqlite: sagas completed, {PARTITIONS} partitions, 1 process"),
            "sagas/s",
            rate(partitioned),
            Some(rate(sqlite_hand)),
            &format!(
                "a Worker (no leases) running all {PARTITIONS} partitions (concurrency {CONCURRENCY} each) + the carrier, live; {:.2}x the unpartitioned saga (Harness)",
                sqlite_saga.as_secs_f64() / partitioned.as_secs_f64()
            ),
        );
        Ok(())
    })
}
