//! The pure process test kit on the fulfillment saga: given inputs, when an
//! input, then outputs; deadlines by a virtual clock; no store.

use aftermath::process::testkit::ProcessTest;
use aftermath_examples::fulfillment::*;
use chrono::Duration;

fn placed(order: &str, card: &str) -> OrderEvent {
    OrderEvent::Placed {
        order: order.into(),
        customer: "c@example.com".into(),
        sku: "sku-1".into(),
        quantity: 2,
        amount: 500,
        card: card.into(),
        address: "1 Main St".into(),
    }
}

fn reserved(order: &str) -> InventoryEvent {
    InventoryEvent::Reserved {
        sku: "sku-1".into(),
        order: order.into(),
        quantity: 2,
    }
}

fn charged(order: &str) -> PaymentEvent {
    PaymentEvent::Charged {
        order: order.into(),
        amount: 500,
    }
}

#[test]
fn placing_reserves_stock() {
    let mut t = ProcessTest::new(Fulfillment);
    t.when(placed("o-1", "visa")).assert_sent::<Inventory>(
        "sku-1",
        InventoryCommand::Reserve {
            sku: "sku-1".into(),
            order: "o-1".into(),
            quantity: 2,
        },
    );
    assert_eq!(t.instance().id, "o-1");
    assert_eq!(t.state().amount, 500);
}

#[test]
fn each_step_registers_its_undo_and_moves_on() {
    let mut t = ProcessTest::new(Fulfillment);
    t.given([FulfillmentInput::from(placed("o-1", "visa"))]);
    let out = t.when(reserved("o-1"));
    out.assert_sent::<Payment>(
        "o-1",
        PaymentCommand::Charge {
            order: "o-1".into(),
            amount: 500,
            card: "visa".into(),
        },
    );
    let out = t.when(charged("o-1"));
    out.assert_sent::<Shipping>(
        "o-1",
        ShippingCommand::Request {
            order: "o-1".into(),
            address: "1 Main St".into(),
        },
    )
    .assert_deadline_set("shipping");
    let (_, due) = out.deadlines_set()[0];
    assert_eq!(due, t.now() + Duration::hours(48));
    assert_eq!(t.instance().compensations().len(), 2);
}

#[test]
fn declined_payment_compensates_and_cancels() {
    let mut t = ProcessTest::new(Fulfillment);
    t.given([
        FulfillmentInput::from(placed("o-1", "declined")),
        reserved("o-1").into(),
    ]);
    let out = t.when_rejected::<Payment>("o-1", "card declined");
    let undo = out.compensations();
    assert_eq!(undo.len(), 1);
    assert!(undo[0].is::<Inventory>());
    out.assert_sent::<Order>(
        "o-1",
        OrderCommand::Cancel {
            reason: "payment failed: card declined".into(),
        },
    );
    assert!(out.completed());
    // A completed instance receives nothing more.
    let late = t.when(charged("o-1"));
    assert!(late.is_empty());
    assert_eq!(late.ignored, vec!["the instance has completed".to_owned()]);
}

#[test]
fn missed_deadline_cancels_shipment_then_undoes_in_reverse_order() {
    let mut t = ProcessTest::new(Fulfillment);
    t.given([
        FulfillmentInput::from(placed("o-1", "visa")),
        reserved("o-1").into(),
        charged("o-1").into(),
    ]);
    assert!(t.advance(Duration::hours(47)).is_empty());
    let out = t.advance(Duration::hours(2));
    out.assert_sent::<Shipping>("o-1", ShippingCommand::Cancel);
    assert!(!out.completed());
    let out = t.when(ShippingEvent::Cancelled {
        order: "o-1".into(),
    });
    // Newest step first: the refund, then the stock.
    let undo = out.compensations();
    assert_eq!(undo.len(), 2);
    assert!(undo[0].is::<Payment>(), "{undo:?}");
    assert!(undo[1].is::<Inventory>(), "{undo:?}");
    assert!(out.completed());
}

#[test]
fn shipment_confirmed_in_time_cancels_the_deadline() {
    let mut t = ProcessTest::new(Fulfillment);
    t.given([
        FulfillmentInput::from(placed("o-1", "visa")),
        reserved("o-1").into(),
        charged("o-1").into(),
    ]);
    let out = t.when(ShippingEvent::Shipped {
        order: "o-1".into(),
    });
    assert_eq!(out.deadlines_cancelled(), vec!["shipping"]);
    out.assert_sent::<Order>("o-1", OrderCommand::Confirm);
    assert!(out.completed());
    assert!(t.advance(Duration::days(30)).is_empty());
}

#[test]
fn shipped_after_the_deadline_fired_still_confirms() {
    // The deadline fired and asked to cancel, but the carrier was faster:
    // the cancellation is refused and `Shipped` arrives.
    let mut t = ProcessTest::new(Fulfillment);
    t.given([
        FulfillmentInput::from(placed("o-1", "visa")),
        reserved("o-1").into(),
        charged("o-1").into(),
    ]);
    t.advance(Duration::hours(49))
        .assert_sent::<Shipping>("o-1", ShippingCommand::Cancel);
    assert!(
        t.when_rejected::<Shipping>("o-1", "the shipment already left")
            .is_empty()
    );
    let out = t.when(ShippingEvent::Shipped {
        order: "o-1".into(),
    });
    out.assert_sent::<Order>("o-1", OrderCommand::Confirm);
    assert!(out.compensations().is_empty());
}

#[test]
fn out_of_stock_cancels_with_nothing_to_undo() {
    let mut t = ProcessTest::new(Fulfillment);
    t.given([placed("o-1", "visa")]);
    let out = t.when_rejected::<Inventory>("sku-1", "insufficient stock");
    assert!(out.compensations().is_empty());
    out.assert_sent::<Order>(
        "o-1",
        OrderCommand::Cancel {
            reason: "out of stock: insufficient stock".into(),
        },
    );
    assert!(out.completed());
}

#[test]
fn a_second_placement_of_the_same_order_is_misrouted() {
    let mut t = ProcessTest::new(Fulfillment);
    t.given([placed("o-1", "visa")]);
    let out = t.when(placed("o-1", "visa"));
    assert!(out.is_empty());
    assert!(
        out.ignored[0].contains("already exists"),
        "{:?}",
        out.ignored
    );
}
