//! The `warehouse` service: one stock per article; an order placed in the
//! `orders` service becomes a reservation here, which succeeds or finds the
//! stock short.

use aftermath::nats::MessageAttributes;
use aftermath::prelude::*;
use serde::{Deserialize, Serialize};

use super::orders::OrderEvent;

/// What happened to an article's stock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "stock")]
pub enum StockEvent {
    /// Goods arrived (private to the warehouse).
    Restocked {
        /// How many.
        quantity: u32,
    },
    /// Reserved for an order (published).
    Reserved {
        /// The order's id.
        order: String,
        /// How many.
        quantity: u32,
    },
    /// Not enough left for an order (published).
    OutOfStock {
        /// The order's id.
        order: String,
        /// How many it asked for.
        quantity: u32,
        /// How many were left.
        available: u32,
    },
}

/// What a stock can be asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum StockCommand {
    /// Goods arrived.
    Restock {
        /// How many.
        quantity: u32,
    },
    /// Reserve for an order.
    Reserve {
        /// The order's id.
        order: String,
        /// How many.
        quantity: u32,
    },
}

/// Why a stock refuses a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StockError {
    /// A reservation of nothing.
    #[error("order `{0}` asks for 0 items")]
    Nothing(String),
}

/// An article's stock, folded from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stock {
    /// On hand and not reserved.
    pub available: u32,
}

impl Aggregate for Stock {
    const CATEGORY: &'static str = "stock";
    type Command = StockCommand;
    type Event = StockEvent;
    type Error = StockError;

    fn decide(&self, command: StockCommand) -> Result<Vec<StockEvent>, StockError> {
        match command {
            StockCommand::Restock { quantity } => Ok(vec![StockEvent::Restocked { quantity }]),
            StockCommand::Reserve { order, quantity: 0 } => Err(StockError::Nothing(order)),
            StockCommand::Reserve { order, quantity } if quantity <= self.available => {
                Ok(vec![StockEvent::Reserved { order, quantity }])
            }
            StockCommand::Reserve { order, quantity } => Ok(vec![StockEvent::OutOfStock {
                order,
                quantity,
                available: self.available,
            }]),
        }
    }

    fn apply(&mut self, event: &StockEvent) {
        match event {
            StockEvent::Restocked { quantity } => self.available += quantity,
            StockEvent::Reserved { quantity, .. } => self.available -= quantity,
            StockEvent::OutOfStock { .. } => {}
        }
    }
}

/// The warehouse inbox's mapping: an order placed in the `orders` service
/// (read through the message contract: `ce-source` is `order-<id>`)
/// becomes a reservation on its article's stock.
// ANCHOR: map_message
pub fn map_order_message(message: &async_nats::Message) -> Result<(String, StockCommand), String> {
    let attributes = MessageAttributes::from_message(message).map_err(|e| e.to_string())?;
    let order = attributes
        .source
        .strip_prefix("order-")
        .ok_or_else(|| format!("ce-source `{}` is not an order", attributes.source))?
        .to_owned();
    match OrderEvent::decode(&attributes.event_type, &message.payload)
        .map_err(|e| format!("{} from {}: {e}", attributes.event_type, attributes.source))?
    {
        Some(OrderEvent::Placed { sku, quantity }) => {
            Ok((sku, StockCommand::Reserve { order, quantity }))
        }
        Some(other) => Err(format!("{other:?} is not for the warehouse")),
        None => Err(format!("`{}` is not an order event", attributes.event_type)),
    }
}
// ANCHOR_END: map_message
