//! Order fulfillment: four aggregates, one saga coordinating them, and
//! reactors for what touches the outside world.
//!
//! ```text
//! Order.Placed ──> saga ──> Inventory.Reserve ──rejected──> Order.Cancel
//!                    │  <── Inventory.Reserved  (undo: Inventory.Release)
//!                    └────> Payment.Charge ──rejected (declined)──> Release, Order.Cancel
//!                      <── Payment.Charged      (undo: Payment.Refund)
//!                    └────> Shipping.Request + deadline "shipping" (48 h)
//!                      <── Shipping.Shipped ──> Inventory.Commit, Order.Confirm, complete
//!           deadline "shipping" due ──> Shipping.Cancel, Refund, Release, Order.Cancel
//! ```
//!
//! Every aggregate only decides; the carrier booking and the customer mail
//! run in reactors ([`reactors`]).

pub mod aggregates;
pub mod reactors;
pub mod saga;

pub use aggregates::{
    Inventory, InventoryCommand, InventoryEvent, Order, OrderCommand, OrderEvent, Payment,
    PaymentCommand, PaymentEvent, Shipping, ShippingCommand, ShippingEvent,
};
pub use saga::{Fulfillment, FulfillmentInput, FulfillmentState};

use aftermath::process::CommandBus;
use aftermath::{EventStore, Repository};

/// A command bus with the four aggregates registered on `store`.
pub fn command_bus<S: EventStore + Clone>(store: &S) -> CommandBus {
    CommandBus::new()
        .register(Repository::<Order, _>::new(store.clone()))
        .register(Repository::<Payment, _>::new(store.clone()))
        .register(Repository::<Inventory, _>::new(store.clone()))
        .register(Repository::<Shipping, _>::new(store.clone()))
}
