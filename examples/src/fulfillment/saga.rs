//! The fulfillment saga: reserve stock, charge, ship; undo in reverse when
//! a step fails or shipping misses its deadline.

use aftermath::process::{Input, Outputs, ProcessManager, Route};
use aftermath::{EventUnion, Recorded};
use chrono::Duration;

use super::aggregates::*;

/// How long the carrier has to confirm the pickup.
pub const SHIPPING_DEADLINE_HOURS: i64 = 48;

/// Everything the saga listens to.
// ANCHOR: input
#[derive(Debug, Clone, PartialEq, EventUnion)]
pub enum FulfillmentInput {
    /// Orders.
    Order(OrderEvent),
    /// Stock.
    Inventory(InventoryEvent),
    /// Payments.
    Payment(PaymentEvent),
    /// Shipments.
    Shipping(ShippingEvent),
}
// ANCHOR_END: input

/// What an instance remembers (folded from its inputs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FulfillmentState {
    /// The order as placed.
    pub order: String,
    /// What.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Cents.
    pub amount: u64,
    /// Card token.
    pub card: String,
    /// Where to.
    pub address: String,
    /// Stock is held.
    pub reserved: bool,
    /// Money is taken.
    pub charged: bool,
    /// The carrier has it.
    pub shipped: bool,
    /// Shipping missed its deadline; waiting for the cancellation.
    pub cancelling_shipment: bool,
}

/// The saga. One instance per order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fulfillment;

// ANCHOR: process
impl ProcessManager for Fulfillment {
    const NAME: &'static str = "fulfillment";
    type Input = FulfillmentInput;
    type State = FulfillmentState;

    fn route(&self, event: &Recorded<FulfillmentInput>) -> Route {
        use FulfillmentInput as I;
        match &event.event {
            I::Order(OrderEvent::Placed { order, .. }) => Route::StartStrict(order.clone()),
            I::Inventory(InventoryEvent::Reserved { order, .. })
            | I::Payment(PaymentEvent::Charged { order, .. })
            | I::Shipping(ShippingEvent::Shipped { order })
            | I::Shipping(ShippingEvent::Cancelled { order }) => Route::Continue(order.clone()),
            _ => Route::Ignore,
        }
    }

    fn apply(&self, state: &mut FulfillmentState, input: &Input<FulfillmentInput>) {
        use FulfillmentInput as I;
        match input {
            Input::Event(e) => match &e.event {
                I::Order(OrderEvent::Placed {
                    order,
                    sku,
                    quantity,
                    amount,
                    card,
                    address,
                    ..
                }) => {
                    state.order.clone_from(order);
                    state.sku.clone_from(sku);
                    state.quantity = *quantity;
                    state.amount = *amount;
                    state.card.clone_from(card);
                    state.address.clone_from(address);
                }
                I::Inventory(InventoryEvent::Reserved { .. }) => state.reserved = true,
                I::Payment(PaymentEvent::Charged { .. }) => state.charged = true,
                I::Shipping(ShippingEvent::Shipped { .. }) => state.shipped = true,
                _ => {}
            },
            Input::Deadline(d) if d.name == "shipping" => state.cancelling_shipment = true,
            _ => {}
        }
    }

    // ANCHOR: handle
    fn handle(&self, s: &FulfillmentState, input: &Input<FulfillmentInput>, out: &mut Outputs) {
        use FulfillmentInput as I;
        let order = s.order.clone();
        match input {
            Input::Event(e) => match &e.event {
                I::Order(OrderEvent::Placed { .. }) => {
                    out.send::<Inventory>(
                        s.sku.clone(),
                        InventoryCommand::Reserve {
                            sku: s.sku.clone(),
                            order,
                            quantity: s.quantity,
                        },
                    );
                }
                I::Inventory(InventoryEvent::Reserved { .. }) => {
                    out.register_compensation::<Inventory>(
                        s.sku.clone(),
                        InventoryCommand::Release {
                            order: order.clone(),
                        },
                    );
                    out.send::<Payment>(
                        order.clone(),
                        PaymentCommand::Charge {
                            order,
                            amount: s.amount,
                            card: s.card.clone(),
                        },
                    );
                }
                I::Payment(PaymentEvent::Charged { .. }) => {
                    out.register_compensation::<Payment>(order.clone(), PaymentCommand::Refund);
                    out.send::<Shipping>(
                        order.clone(),
                        ShippingCommand::Request {
                            order,
                            address: s.address.clone(),
                        },
                    );
                    out.set_deadline_after("shipping", Duration::hours(SHIPPING_DEADLINE_HOURS));
                }
                I::Shipping(ShippingEvent::Shipped { .. }) => {
                    // Also when the deadline fired but the cancellation lost
                    // the race against the carrier: it did ship.
                    out.cancel_deadline("shipping");
                    out.send::<Inventory>(
                        s.sku.clone(),
                        InventoryCommand::Commit {
                            order: order.clone(),
                        },
                    );
                    out.send::<Order>(order, OrderCommand::Confirm);
                    out.complete();
                }
                I::Shipping(ShippingEvent::Cancelled { .. }) => {
                    give_up(out, &order, "not shipped within 48 hours");
                }
                _ => {}
            },
            Input::Deadline(d) if d.name == "shipping" && !s.shipped => {
                // Call the carrier off first; compensate once it is off.
                out.send::<Shipping>(order, ShippingCommand::Cancel);
            }
            Input::Rejected(r) if r.is::<Inventory>() && !r.compensation => {
                give_up(out, &order, &format!("out of stock: {}", r.error));
            }
            Input::Rejected(r) if r.is::<Payment>() && !r.compensation => {
                give_up(out, &order, &format!("payment failed: {}", r.error));
            }
            // The carrier confirmed before our cancellation: `Shipped` follows.
            Input::Rejected(_) | Input::Deadline(_) => {}
        }
    }
    // ANCHOR_END: handle
}
// ANCHOR_END: process

/// Undo what succeeded (newest first), cancel the order, finish.
fn give_up(out: &mut Outputs, order: &str, reason: &str) {
    out.compensate();
    out.send::<Order>(
        order.to_owned(),
        OrderCommand::Cancel {
            reason: reason.to_owned(),
        },
    );
    out.complete();
}
