//! Order fulfillment end to end on the embedded SQLite store: four
//! aggregates, one saga, two reactors, all running in a `Worker`.
//!
//! ```text
//! cargo run -p aftermath-examples --bin fulfillment [path/to/fulfillment.db]
//! ```
//!
//! Without a path it uses a fresh file in a temporary directory. Three
//! orders go through the saga and each prints its timeline (every event of
//! its correlation id across all streams, the saga's records and the
//! reactors' effects, indented under their causes):
//!
//! 1. the happy path: stock reserved, card charged, carrier books and
//!    confirms the pickup, order confirmed, mail sent;
//! 2. a declined card: the payment refuses the charge, the saga releases the
//!    stock (its registered compensation) and cancels the order;
//! 3. an address the carrier cannot reach: the pickup is never confirmed;
//!    after the 48-hour deadline (a virtual clock jumps two days) the saga
//!    calls the shipment off, refunds, releases the stock, cancels.

use std::time::Duration;

use aftermath::prelude::*;
use aftermath::process::{ManualClock, ProcessOptions, timeline};
use aftermath_examples::fulfillment::aggregates::OrderStatus;
use aftermath_examples::fulfillment::reactors::{Carrier, CarrierBooking, CustomerMail, Mailbox};
use aftermath_examples::fulfillment::*;
use uuid::Uuid;

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| dir.path().join("fulfillment.db").display().to_string());
    let store = SqliteStore::open(&path).await?;
    println!("event store: {path} (SQLite)\n");

    // ANCHOR: worker
    let clock = ManualClock::at(chrono::Utc::now());
    let carrier = Carrier::new();
    let mailbox = Mailbox::new();
    // The saga on a virtual clock, so the example can let two days pass.
    let saga = ProcessRunner::new(
        Fulfillment,
        store.clone(),
        command_bus(&store),
        store.clone(), // deadlines
        store.clone(), // checkpoints
    )
    .clock(clock.clone())
    .options(ProcessOptions::default().deadline_poll(Duration::from_millis(50)));
    // One store in every role: events, journal, checkpoints, deadlines, leases.
    let worker = Worker::on(store.clone())
        .leased(Duration::from_secs(10))
        .add_subscriber(saga)
        .reactor(CarrierBooking {
            carrier: carrier.clone(),
        })
        .reactor(CustomerMail {
            mailbox: mailbox.clone(),
        })
        .start()
        .expect("unique subscriber names");
    // ANCHOR_END: worker

    let orders = Repository::<Order, _>::new(store.clone());
    let shipping = Repository::<Shipping, _>::new(store.clone());
    Repository::<Inventory, _>::new(store.clone())
        .execute(
            "book-42",
            InventoryCommand::Restock {
                sku: "book-42".into(),
                quantity: 10,
            },
        )
        .await?;

    println!("== 1. happy path ==");
    let run = Uuid::now_v7().simple().to_string()[..8].to_owned();
    let happy = place(
        &orders,
        &format!("A-{run}"),
        "visa-4242",
        "221B Baker Street",
    )
    .await?;
    wait_until("the carrier booking", || async {
        Ok(!carrier.bookings().is_empty())
    })
    .await?;
    let confirmed = carrier.call_back(&shipping).await;
    println!("carrier webhook confirmed {confirmed} pickup(s)");
    wait_for(&orders, &format!("A-{run}"), OrderStatus::Confirmed).await?;
    print_timeline(&store, happy).await?;

    println!("== 2. declined card ==");
    let declined = place(
        &orders,
        &format!("B-{run}"),
        "declined",
        "221B Baker Street",
    )
    .await?;
    wait_for(&orders, &format!("B-{run}"), OrderStatus::Cancelled).await?;
    print_timeline(&store, declined).await?;

    println!("== 3. shipping not confirmed in time ==");
    let late = place(&orders, &format!("C-{run}"), "visa-4242", "unreachable").await?;
    wait_until("the carrier booking", || async {
        Ok(carrier.bookings().len() == 2)
    })
    .await?;
    let confirmed = carrier.call_back(&shipping).await;
    println!("carrier webhook confirmed {confirmed} pickup(s); two days pass (virtual clock)");
    // ANCHOR: advance
    clock.advance(chrono::Duration::hours(49));
    // ANCHOR_END: advance
    wait_for(&orders, &format!("C-{run}"), OrderStatus::Cancelled).await?;
    print_timeline(&store, late).await?;

    let stock = Repository::<Inventory, _>::new(store.clone())
        .load("book-42")
        .await?
        .state;
    println!(
        "stock of book-42: {} available, {} shipped, {} reserved (restocked {})",
        stock.available,
        stock.shipped,
        stock.reserved.len(),
        stock.restocked
    );
    // Mails are sent by a reactor after the order's last event: give it a moment.
    wait_until("the customer mails", || async {
        Ok(mailbox.sent().len() >= 3)
    })
    .await?;
    for mail in mailbox.sent() {
        println!("mail to {}: {}", mail.to, mail.subject);
    }
    worker.shutdown().await;
    Ok(())
}

/// Places an order with a fresh correlation id (the order's conversation);
/// the saga instance and every command it sends carry it.
// ANCHOR: place
async fn place(
    orders: &Repository<Order, SqliteStore>,
    id: &str,
    card: &str,
    address: &str,
) -> Result<Uuid, Error> {
    let correlation = Uuid::now_v7();
    orders
        .execute_with(
            id,
            OrderCommand::Place {
                order: id.into(),
                customer: format!("{}@example.com", id.to_lowercase()),
                sku: "book-42".into(),
                quantity: 2,
                amount: 3_998,
                card: card.into(),
                address: address.into(),
            },
            CommandMeta::with_id(Uuid::now_v7()).correlation(correlation),
        )
        .await?;
    println!("placed order {id} (card {card}, address {address})");
    Ok(correlation)
}
// ANCHOR_END: place

async fn wait_for(
    orders: &Repository<Order, SqliteStore>,
    id: &str,
    status: OrderStatus,
) -> Result<(), Error> {
    wait_until(&format!("order {id} to be {status:?}"), || async {
        Ok(orders.load(id).await?.state.status == status)
    })
    .await?;
    println!("order {id} is {status:?}");
    Ok(())
}

async fn wait_until<F, Fut>(what: &str, mut done: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, Error>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done().await? {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("gave up waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn print_timeline(store: &SqliteStore, correlation: Uuid) -> Result<(), Error> {
    // The saga's last records are written just after the order's last event.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ANCHOR: timeline
    println!("\n{}", timeline(store, store, correlation).await?);
    // ANCHOR_END: timeline
    Ok(())
}
