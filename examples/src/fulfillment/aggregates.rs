//! The four aggregates. Each decides purely from its state and the command.

use std::collections::BTreeMap;

use aftermath::{Aggregate, Event};
use serde::{Deserialize, Serialize};

/// An order's lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Not placed yet.
    #[default]
    New,
    /// Placed, being fulfilled.
    Placed,
    /// Shipped and paid.
    Confirmed,
    /// Given up; everything undone.
    Cancelled,
}

/// A customer's order.
#[derive(Debug, Default)]
pub struct Order {
    /// Its id, once placed.
    pub id: String,
    /// Who ordered.
    pub customer: String,
    /// Where it is.
    pub status: OrderStatus,
}

/// What can be asked of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderCommand {
    /// Place it.
    Place {
        /// The order id (also the aggregate id).
        order: String,
        /// Who ordered (mail address).
        customer: String,
        /// What.
        sku: String,
        /// How many.
        quantity: u32,
        /// Total price in cents.
        amount: u64,
        /// Card token (`"declined"` is refused by the payment provider).
        card: String,
        /// Where to ship (`"unreachable"` is never confirmed by the carrier).
        address: String,
    },
    /// Shipped and paid: done.
    Confirm,
    /// Give up.
    Cancel {
        /// Why.
        reason: String,
    },
}

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "order")]
pub enum OrderEvent {
    /// It was placed.
    Placed {
        /// The order id.
        order: String,
        /// Who ordered.
        customer: String,
        /// What.
        sku: String,
        /// How many.
        quantity: u32,
        /// Total in cents.
        amount: u64,
        /// Card token.
        card: String,
        /// Shipping address.
        address: String,
    },
    /// It was fulfilled.
    Confirmed {
        /// The order id.
        order: String,
        /// Who ordered.
        customer: String,
    },
    /// It was cancelled.
    Cancelled {
        /// The order id.
        order: String,
        /// Who ordered.
        customer: String,
        /// Why.
        reason: String,
    },
}

/// Why an order refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// Place on a placed order.
    #[error("order already placed")]
    AlreadyPlaced,
    /// Confirm/cancel before placing.
    #[error("order not placed")]
    NotPlaced,
    /// Confirm a cancelled order, or cancel a confirmed one.
    #[error("order already closed as {0:?}")]
    Closed(OrderStatus),
    /// A zero quantity.
    #[error("an order needs a quantity of at least 1")]
    NoQuantity,
}

impl Aggregate for Order {
    const CATEGORY: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn decide(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        let (order, customer) = (self.id.clone(), self.customer.clone());
        match (command, self.status) {
            (OrderCommand::Place { .. }, s) if s != OrderStatus::New => {
                Err(OrderError::AlreadyPlaced)
            }
            (OrderCommand::Place { quantity: 0, .. }, _) => Err(OrderError::NoQuantity),
            (
                OrderCommand::Place {
                    order,
                    customer,
                    sku,
                    quantity,
                    amount,
                    card,
                    address,
                },
                _,
            ) => Ok(vec![OrderEvent::Placed {
                order,
                customer,
                sku,
                quantity,
                amount,
                card,
                address,
            }]),
            (_, OrderStatus::New) => Err(OrderError::NotPlaced),
            (OrderCommand::Confirm, OrderStatus::Confirmed) => Ok(vec![]),
            (OrderCommand::Cancel { .. }, OrderStatus::Cancelled) => Ok(vec![]),
            (_, s @ (OrderStatus::Confirmed | OrderStatus::Cancelled)) => {
                Err(OrderError::Closed(s))
            }
            (OrderCommand::Confirm, _) => Ok(vec![OrderEvent::Confirmed { order, customer }]),
            (OrderCommand::Cancel { reason }, _) => Ok(vec![OrderEvent::Cancelled {
                order,
                customer,
                reason,
            }]),
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Placed {
                order, customer, ..
            } => {
                self.status = OrderStatus::Placed;
                self.id.clone_from(order);
                self.customer.clone_from(customer);
            }
            OrderEvent::Confirmed { .. } => self.status = OrderStatus::Confirmed,
            OrderEvent::Cancelled { .. } => self.status = OrderStatus::Cancelled,
        }
    }
}

/// Stock of one SKU: available units and reservations per order.
#[derive(Debug, Default)]
pub struct Inventory {
    /// The SKU (the aggregate id).
    pub sku: String,
    /// Units free to reserve.
    pub available: u64,
    /// Units held for orders not shipped yet.
    pub reserved: BTreeMap<String, u32>,
    /// Units that left with shipped orders.
    pub shipped: u64,
    /// Units ever restocked.
    pub restocked: u64,
}

/// What can be asked of an SKU's stock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InventoryCommand {
    /// Units arrived.
    Restock {
        /// The SKU (the aggregate id).
        sku: String,
        /// How many.
        quantity: u32,
    },
    /// Hold units for an order.
    Reserve {
        /// The SKU (the aggregate id).
        sku: String,
        /// The order.
        order: String,
        /// How many.
        quantity: u32,
    },
    /// Undo a reservation (no-op when there is none).
    Release {
        /// The order.
        order: String,
    },
    /// The reserved units left with the shipment.
    Commit {
        /// The order.
        order: String,
    },
}

/// What happened to an SKU's stock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "inventory")]
pub enum InventoryEvent {
    /// Units arrived.
    Restocked {
        /// The SKU.
        sku: String,
        /// How many.
        quantity: u32,
    },
    /// Units held for an order.
    Reserved {
        /// The SKU.
        sku: String,
        /// The order.
        order: String,
        /// How many.
        quantity: u32,
    },
    /// A reservation undone.
    Released {
        /// The SKU.
        sku: String,
        /// The order.
        order: String,
        /// How many.
        quantity: u32,
    },
    /// Reserved units shipped.
    Committed {
        /// The SKU.
        sku: String,
        /// The order.
        order: String,
        /// How many.
        quantity: u32,
    },
}

/// Why stock refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    /// Not enough units.
    #[error("insufficient stock: {requested} requested, {available} available")]
    Insufficient {
        /// Asked for.
        requested: u32,
        /// There.
        available: u64,
    },
    /// Commit without a reservation.
    #[error("no reservation for order `{0}`")]
    NoReservation(String),
}

impl Aggregate for Inventory {
    const CATEGORY: &'static str = "inventory";
    type Command = InventoryCommand;
    type Event = InventoryEvent;
    type Error = InventoryError;

    fn decide(&self, command: InventoryCommand) -> Result<Vec<InventoryEvent>, InventoryError> {
        Ok(match command {
            InventoryCommand::Restock { sku, quantity } => {
                vec![InventoryEvent::Restocked { sku, quantity }]
            }
            InventoryCommand::Reserve {
                sku,
                order,
                quantity,
            } => {
                if self.reserved.contains_key(&order) {
                    return Ok(vec![]);
                }
                if u64::from(quantity) > self.available {
                    return Err(InventoryError::Insufficient {
                        requested: quantity,
                        available: self.available,
                    });
                }
                vec![InventoryEvent::Reserved {
                    sku,
                    order,
                    quantity,
                }]
            }
            InventoryCommand::Release { order } => match self.reserved.get(&order) {
                Some(&quantity) => vec![InventoryEvent::Released {
                    sku: self.sku.clone(),
                    order,
                    quantity,
                }],
                None => vec![],
            },
            InventoryCommand::Commit { order } => match self.reserved.get(&order) {
                Some(&quantity) => vec![InventoryEvent::Committed {
                    sku: self.sku.clone(),
                    order,
                    quantity,
                }],
                None => return Err(InventoryError::NoReservation(order)),
            },
        })
    }

    fn apply(&mut self, event: &InventoryEvent) {
        match event {
            InventoryEvent::Restocked { sku, quantity } => {
                self.sku.clone_from(sku);
                self.available += u64::from(*quantity);
                self.restocked += u64::from(*quantity);
            }
            InventoryEvent::Reserved {
                sku,
                order,
                quantity,
            } => {
                self.sku.clone_from(sku);
                self.available -= u64::from(*quantity);
                self.reserved.insert(order.clone(), *quantity);
            }
            InventoryEvent::Released {
                order, quantity, ..
            } => {
                self.available += u64::from(*quantity);
                self.reserved.remove(order);
            }
            InventoryEvent::Committed {
                order, quantity, ..
            } => {
                self.shipped += u64::from(*quantity);
                self.reserved.remove(order);
            }
        }
    }
}

/// A payment for one order (the aggregate id is the order id).
#[derive(Debug, Default)]
pub struct Payment {
    /// The order.
    pub order: String,
    /// Cents charged and not refunded.
    pub charged: u64,
    /// Cents refunded.
    pub refunded: u64,
}

/// What can be asked of a payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PaymentCommand {
    /// Charge the card. The card token stands in for the payment provider's
    /// answer, so the decision stays pure: `"declined"` is refused.
    Charge {
        /// The order.
        order: String,
        /// Cents.
        amount: u64,
        /// Card token.
        card: String,
    },
    /// Give the money back (no-op when nothing is charged).
    Refund,
}

/// What happened to a payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "payment")]
pub enum PaymentEvent {
    /// Money taken.
    Charged {
        /// The order.
        order: String,
        /// Cents.
        amount: u64,
    },
    /// Money returned.
    Refunded {
        /// The order.
        order: String,
        /// Cents.
        amount: u64,
    },
}

/// Why a payment refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The card was declined.
    #[error("card declined")]
    Declined,
    /// Charged twice.
    #[error("already charged")]
    AlreadyCharged,
}

impl Aggregate for Payment {
    const CATEGORY: &'static str = "payment";
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = PaymentError;

    fn decide(&self, command: PaymentCommand) -> Result<Vec<PaymentEvent>, PaymentError> {
        match command {
            PaymentCommand::Charge { .. } if self.charged > 0 => Err(PaymentError::AlreadyCharged),
            PaymentCommand::Charge { card, .. } if card == "declined" => {
                Err(PaymentError::Declined)
            }
            PaymentCommand::Charge { order, amount, .. } => {
                Ok(vec![PaymentEvent::Charged { order, amount }])
            }
            PaymentCommand::Refund if self.charged == 0 => Ok(vec![]),
            PaymentCommand::Refund => Ok(vec![PaymentEvent::Refunded {
                order: self.order.clone(),
                amount: self.charged,
            }]),
        }
    }

    fn apply(&mut self, event: &PaymentEvent) {
        match event {
            PaymentEvent::Charged { order, amount } => {
                self.order.clone_from(order);
                self.charged += amount;
            }
            PaymentEvent::Refunded { amount, .. } => {
                self.charged -= amount;
                self.refunded += amount;
            }
        }
    }
}

/// A shipment of one order (the aggregate id is the order id).
#[derive(Debug, Default)]
pub struct Shipping {
    /// The order.
    pub order: String,
    /// Requested, not shipped or cancelled.
    pub requested: bool,
    /// The carrier confirmed the pickup.
    pub shipped: bool,
    /// Called off.
    pub cancelled: bool,
}

/// What can be asked of a shipment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ShippingCommand {
    /// Ask a carrier to pick it up.
    Request {
        /// The order.
        order: String,
        /// Where to.
        address: String,
    },
    /// The carrier confirmed the pickup (its webhook).
    Confirm,
    /// Call it off.
    Cancel,
}

/// What happened to a shipment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "shipping")]
pub enum ShippingEvent {
    /// A pickup was requested.
    Requested {
        /// The order.
        order: String,
        /// Where to.
        address: String,
    },
    /// The carrier has it.
    Shipped {
        /// The order.
        order: String,
    },
    /// Called off.
    Cancelled {
        /// The order.
        order: String,
    },
}

/// Why a shipment refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShippingError {
    /// Confirm or cancel without a request.
    #[error("no shipment requested")]
    NotRequested,
    /// Confirm after cancel.
    #[error("the shipment was cancelled")]
    Cancelled,
    /// Cancel after it left.
    #[error("the shipment already left")]
    AlreadyShipped,
}

impl Aggregate for Shipping {
    const CATEGORY: &'static str = "shipping";
    type Command = ShippingCommand;
    type Event = ShippingEvent;
    type Error = ShippingError;

    fn decide(&self, command: ShippingCommand) -> Result<Vec<ShippingEvent>, ShippingError> {
        match command {
            ShippingCommand::Request { .. } if self.requested => Ok(vec![]),
            ShippingCommand::Request { order, address } => {
                Ok(vec![ShippingEvent::Requested { order, address }])
            }
            _ if !self.requested => Err(ShippingError::NotRequested),
            ShippingCommand::Confirm if self.shipped => Ok(vec![]),
            ShippingCommand::Confirm if self.cancelled => Err(ShippingError::Cancelled),
            ShippingCommand::Confirm => Ok(vec![ShippingEvent::Shipped {
                order: self.order.clone(),
            }]),
            ShippingCommand::Cancel if self.cancelled => Ok(vec![]),
            ShippingCommand::Cancel if self.shipped => Err(ShippingError::AlreadyShipped),
            ShippingCommand::Cancel => Ok(vec![ShippingEvent::Cancelled {
                order: self.order.clone(),
            }]),
        }
    }

    fn apply(&mut self, event: &ShippingEvent) {
        match event {
            ShippingEvent::Requested { order, .. } => {
                self.order.clone_from(order);
                self.requested = true;
            }
            ShippingEvent::Shipped { .. } => self.shipped = true,
            ShippingEvent::Cancelled { .. } => self.cancelled = true,
        }
    }
}
