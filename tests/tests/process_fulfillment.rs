//! The fulfillment saga end to end on the in-memory store, through the
//! process test harness: aggregates, saga, reactors and a virtual clock.

use aftermath::process::testkit::Harness;
use aftermath::process::{ManualClock, MemoryDeadlines, ProcessRunner};
use aftermath::reactor::{MemoryJournal, ReactorRunner};
use aftermath::subscription::MemoryCheckpoints;
use aftermath::{MemoryStore, Repository};
use aftermath_examples::fulfillment::reactors::{Carrier, CarrierBooking, CustomerMail, Mailbox};
use aftermath_examples::fulfillment::*;
use chrono::{Duration, TimeZone, Utc};

struct World {
    store: MemoryStore,
    clock: ManualClock,
    harness: Harness<MemoryStore>,
    carrier: Carrier,
    mailbox: Mailbox,
}

fn world() -> World {
    let store = MemoryStore::new();
    let clock = ManualClock::at(Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap());
    let carrier = Carrier::new();
    let mailbox = Mailbox::new();
    let saga = ProcessRunner::new(
        Fulfillment,
        store.clone(),
        command_bus(&store),
        MemoryDeadlines::new(),
        MemoryCheckpoints::new(),
    )
    .clock(clock.clone());
    let harness = Harness::new(store.clone())
        .with(saga)
        .with(ReactorRunner::new(
            CarrierBooking {
                carrier: carrier.clone(),
            },
            store.clone(),
            MemoryJournal::new(),
            MemoryCheckpoints::new(),
        ))
        .with(ReactorRunner::new(
            CustomerMail {
                mailbox: mailbox.clone(),
            },
            store.clone(),
            MemoryJournal::new(),
            MemoryCheckpoints::new(),
        ));
    World {
        store,
        clock,
        harness,
        carrier,
        mailbox,
    }
}

async fn place(w: &World, order: &str, card: &str, address: &str, quantity: u32) {
    Repository::<Order, _>::new(w.store.clone())
        .execute(
            order,
            OrderCommand::Place {
                order: order.into(),
                customer: format!("{order}@example.com"),
                sku: "sku-1".into(),
                quantity,
                amount: 1_000,
                card: card.into(),
                address: address.into(),
            },
        )
        .await
        .unwrap();
}

async fn restock(w: &World, quantity: u32) {
    Repository::<Inventory, _>::new(w.store.clone())
        .execute(
            "sku-1",
            InventoryCommand::Restock {
                sku: "sku-1".into(),
                quantity,
            },
        )
        .await
        .unwrap();
}

async fn order(w: &World, id: &str) -> aftermath::Loaded<Order> {
    Repository::<Order, _>::new(w.store.clone())
        .load(id)
        .await
        .unwrap()
}

async fn stock(w: &World) -> Inventory {
    Repository::<Inventory, _>::new(w.store.clone())
        .load("sku-1")
        .await
        .unwrap()
        .state
}

async fn payment(w: &World, id: &str) -> Payment {
    Repository::<Payment, _>::new(w.store.clone())
        .load(id)
        .await
        .unwrap()
        .state
}

#[tokio::test]
async fn happy_path_ships_charges_and_confirms() {
    let w = world();
    restock(&w, 5).await;
    place(&w, "o-1", "visa", "1 Main St", 2).await;
    w.harness.settle().await.unwrap();
    assert_eq!(w.carrier.bookings().len(), 1);
    assert_eq!(
        w.carrier.call_back(&Repository::new(w.store.clone())).await,
        1
    );
    w.harness.settle().await.unwrap();
    assert_eq!(
        order(&w, "o-1").await.state.status,
        aggregates::OrderStatus::Confirmed
    );
    let s = stock(&w).await;
    assert_eq!((s.available, s.shipped, s.reserved.len()), (3, 2, 0));
    assert_eq!(payment(&w, "o-1").await.charged, 1_000);
    let mails = w.mailbox.sent();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].subject.contains("on its way"), "{mails:?}");
    // The deadline was cancelled: moving past it changes nothing.
    let head = w.store.head_position().await;
    w.clock.advance(Duration::hours(72));
    w.harness.settle().await.unwrap();
    assert_eq!(w.store.head_position().await, head);
}

#[tokio::test]
async fn declined_payment_releases_stock_and_cancels() {
    let w = world();
    restock(&w, 5).await;
    place(&w, "o-2", "declined", "1 Main St", 2).await;
    w.harness.settle().await.unwrap();
    assert_eq!(
        order(&w, "o-2").await.state.status,
        aggregates::OrderStatus::Cancelled
    );
    let s = stock(&w).await;
    assert_eq!((s.available, s.reserved.len()), (5, 0));
    assert_eq!(payment(&w, "o-2").await.charged, 0);
    assert!(w.carrier.bookings().is_empty());
    assert!(
        w.mailbox.sent()[0]
            .subject
            .contains("payment failed: card declined")
    );
}

#[tokio::test]
async fn out_of_stock_cancels_without_compensation() {
    let w = world();
    restock(&w, 1).await;
    place(&w, "o-3", "visa", "1 Main St", 2).await;
    w.harness.settle().await.unwrap();
    assert_eq!(
        order(&w, "o-3").await.state.status,
        aggregates::OrderStatus::Cancelled
    );
    assert_eq!(stock(&w).await.available, 1);
}

#[tokio::test]
async fn missed_shipping_deadline_refunds_releases_and_cancels() {
    let w = world();
    restock(&w, 5).await;
    place(&w, "o-4", "visa", "unreachable", 1).await;
    w.harness.settle().await.unwrap();
    assert_eq!(
        w.carrier.call_back(&Repository::new(w.store.clone())).await,
        0
    );
    assert_eq!(payment(&w, "o-4").await.charged, 1_000);
    w.clock.advance(Duration::hours(47));
    w.harness.settle().await.unwrap();
    assert_eq!(
        order(&w, "o-4").await.state.status,
        aggregates::OrderStatus::Placed
    );
    w.clock.advance(Duration::hours(2));
    w.harness.settle().await.unwrap();
    assert_eq!(
        order(&w, "o-4").await.state.status,
        aggregates::OrderStatus::Cancelled
    );
    let p = payment(&w, "o-4").await;
    assert_eq!((p.charged, p.refunded), (0, 1_000));
    let s = stock(&w).await;
    assert_eq!((s.available, s.reserved.len()), (5, 0));
}

trait HeadPosition {
    async fn head_position(&self) -> aftermath::Position;
}

impl HeadPosition for MemoryStore {
    async fn head_position(&self) -> aftermath::Position {
        aftermath::EventStore::head(self).await.unwrap()
    }
}

#[tokio::test]
async fn timeline_shows_rejection_compensation_and_effects() {
    let w = world();
    restock(&w, 5).await;
    place(&w, "o-5", "declined", "1 Main St", 1).await;
    w.harness.settle().await.unwrap();
    let placed = aftermath::EventStore::read_stream(
        &w.store,
        "order-o-5",
        1,
        aftermath::Direction::Forward,
        1,
    )
    .await
    .unwrap();
    let correlation = placed[0].metadata.correlation_id;
    // The journals of this world are per reactor in memory; the store has
    // no journal of its own, so an empty one stands in.
    let timeline = aftermath::process::timeline(&w.store, &MemoryJournal::new(), correlation)
        .await
        .unwrap();
    let text = timeline.to_string();
    println!("{text}");
    let types: Vec<&str> = timeline.events().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types.first(), Some(&"OrderPlaced"), "{text}");
    assert!(text.contains("REJECTION of payment-o-5"), "{text}");
    assert!(text.contains("sent COMPENSATION inventory-sku-1"), "{text}");
    assert!(text.contains("COMPLETED"), "{text}");
    assert!(types.contains(&"StockReleased"), "{text}");
    assert!(types.contains(&"OrderCancelled"), "{text}");
    // Every event but the first has its cause inside the timeline.
    let ids: std::collections::HashSet<_> = timeline.events().map(|e| e.id).collect();
    for e in timeline.events().skip(1) {
        assert!(
            ids.contains(&e.metadata.causation_id),
            "{} has no cause in the timeline\n{text}",
            e.event_type
        );
    }
}
