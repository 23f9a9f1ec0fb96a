//! The `orders` service: customers place orders; the warehouse's answer
//! (reserved or out of stock) settles each one.

use aftermath::nats::MessageAttributes;
use aftermath::prelude::*;
use serde::{Deserialize, Serialize};

use super::warehouse::StockEvent;

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "order")]
pub enum OrderEvent {
    /// The customer placed it (published to the warehouse).
    Placed {
        /// The article.
        sku: String,
        /// How many.
        quantity: u32,
    },
    /// The warehouse reserved the stock.
    Reserved,
    /// The warehouse had not enough stock.
    OutOfStock,
}

/// What an order can be asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderCommand {
    /// Place it.
    Place {
        /// The article.
        sku: String,
        /// How many.
        quantity: u32,
    },
    /// The warehouse reserved it.
    ConfirmReservation,
    /// The warehouse could not.
    MarkOutOfStock,
}

/// Why an order refuses a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OrderError {
    /// Placed before.
    #[error("the order was placed already")]
    AlreadyPlaced,
    /// An answer about an order that does not exist here.
    #[error("no such order was placed")]
    NotPlaced,
    /// A second, different answer.
    #[error("the order is settled already ({0})")]
    AlreadySettled(&'static str),
}

/// Where an order stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Not placed.
    #[default]
    None,
    /// Placed, waiting for the warehouse.
    Placed,
    /// Stock reserved.
    Reserved,
    /// Out of stock.
    OutOfStock,
}

/// An order, folded from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Its status.
    pub status: OrderStatus,
}

impl Aggregate for Order {
    const CATEGORY: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn decide(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderStatus::*;
        match (command, self.status) {
            (OrderCommand::Place { sku, quantity }, None) => {
                Ok(vec![OrderEvent::Placed { sku, quantity }])
            }
            (OrderCommand::Place { .. }, _) => Err(OrderError::AlreadyPlaced),
            (_, None) => Err(OrderError::NotPlaced),
            (OrderCommand::ConfirmReservation, Placed) => Ok(vec![OrderEvent::Reserved]),
            (OrderCommand::MarkOutOfStock, Placed) => Ok(vec![OrderEvent::OutOfStock]),
            (_, Reserved) => Err(OrderError::AlreadySettled("reserved")),
            (_, OutOfStock) => Err(OrderError::AlreadySettled("out of stock")),
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        self.status = match event {
            OrderEvent::Placed { .. } => OrderStatus::Placed,
            OrderEvent::Reserved => OrderStatus::Reserved,
            OrderEvent::OutOfStock => OrderStatus::OutOfStock,
        };
    }
}

/// The orders inbox's mapping: a warehouse event (read through the
/// message contract) becomes a command on the order it names.
pub fn map_warehouse_message(
    message: &async_nats::Message,
) -> Result<(String, OrderCommand), String> {
    let attributes = MessageAttributes::from_message(message).map_err(|e| e.to_string())?;
    let event = StockEvent::decode(&attributes.event_type, &message.payload)
        .map_err(|e| format!("{} from {}: {e}", attributes.event_type, attributes.source))?
        .ok_or_else(|| format!("`{}` is not a warehouse event", attributes.event_type))?;
    match event {
        StockEvent::Reserved { order, .. } => Ok((order, OrderCommand::ConfirmReservation)),
        StockEvent::OutOfStock { order, .. } => Ok((order, OrderCommand::MarkOutOfStock)),
        StockEvent::Restocked { .. } => Err("a restock is not published to orders".into()),
    }
}
