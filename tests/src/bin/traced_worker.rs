//! Child process of `tests/tests/telemetry.rs`: places a fulfillment order
//! inside a given trace context (its third argument, no OpenTelemetry layer: the
//! context is handed on explicitly, as an application without one would),
//! runs the saga in a worker, and prints `placed` and then `saga:<n>`
//! whenever the saga instance's stream grew, until it is killed. The mail
//! reactor is left to the process that takes over.

use std::time::Duration;

use aftermath::process::{ProcessOptions, ProcessRunner};
use aftermath::trace::TraceContext;
use aftermath::worker::Worker;
use aftermath::{CommandMeta, EventStore, Repository, SqliteStore};
use aftermath_examples::fulfillment::*;
use uuid::Uuid;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: traced_worker DB ORDER TRACEPARENT";
    let path = args.next().expect(usage);
    let order = args.next().expect(usage);
    let trace = TraceContext::parse(&args.next().expect(usage), None).expect("a valid TRACEPARENT");
    let store = SqliteStore::open(&path).await.expect("open the store");
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
    Repository::<Order, _>::new(store.clone())
        .execute_with(
            &order,
            place(&order, "declined"),
            CommandMeta::with_id(Uuid::new_v5(&Uuid::NAMESPACE_OID, order.as_bytes()))
                .trace(&trace),
        )
        .await
        .expect("place the order");
    println!("placed");
    let saga = ProcessRunner::new(
        Fulfillment,
        store.clone(),
        command_bus(&store),
        store.clone(),
        store.clone(),
    )
    .options(ProcessOptions::default().concurrency(1));
    let _worker = Worker::new()
        .add_subscriber(saga)
        .start()
        .expect("unique subscriber names");
    let instance = aftermath::process::record::stream_of("fulfillment", &order);
    let mut seen = 0;
    loop {
        let version = store
            .stream_version(&instance)
            .await
            .expect("read the saga's version");
        if version > seen {
            seen = version;
            println!("saga:{seen}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
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
