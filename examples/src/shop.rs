//! A small shop: orders are placed and paid. The [`Order`] aggregate only
//! decides; everything that touches the outside world happens afterwards,
//! in reactors:
//!
//! - [`ChargePayment`] (`payments`) charges the payment provider for every
//!   placed order, then records the payment on the order (a `Paid` event).
//!   The provider call carries the effect's idempotency key, and the
//!   command that records the payment has a command id derived from it, so
//!   a retry after a crash charges once and records once.
//! - [`ConfirmationMail`] (`confirmation-mail`) mails the customer when an
//!   order is paid.
//!
//! Both talk HTTP to the local [`effects_service`](crate::effects_service),
//! which stands in for the two providers (`/payments` and `/mail`). The
//! `shop` binary adds a NATS outbox that publishes the order events as
//! integration events.

use std::net::SocketAddr;

use aftermath::prelude::*;
use aftermath::reactor::{EffectContext, ReactError, Reactor};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::effects_service::{classify, post};

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "order")]
pub enum OrderEvent {
    /// The customer placed the order.
    Placed {
        /// Where confirmations go.
        email: String,
        /// What was ordered.
        items: Vec<String>,
        /// Total in cents.
        total: u64,
    },
    /// The payment provider charged the customer.
    Paid {
        /// Amount in cents.
        amount: u64,
        /// The provider's reference (the charge's idempotency key).
        payment: String,
    },
}

/// What an order can be asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderCommand {
    /// Place the order.
    Place {
        /// Where confirmations go.
        email: String,
        /// What is ordered.
        items: Vec<String>,
        /// Total in cents.
        total: u64,
    },
    /// Record a successful charge.
    RecordPayment {
        /// Amount in cents.
        amount: u64,
        /// The provider's reference.
        payment: String,
    },
}

/// Why an order refuses a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OrderError {
    /// Placed before.
    #[error("the order was placed already")]
    AlreadyPlaced,
    /// Nothing to pay for yet.
    #[error("the order was not placed")]
    NotPlaced,
    /// An order needs at least one item.
    #[error("an order needs at least one item")]
    Empty,
    /// Paid before.
    #[error("the order is paid already")]
    AlreadyPaid,
    /// The charge does not match the total.
    #[error("paid {paid}, but the order totals {total}")]
    WrongAmount {
        /// The order's total.
        total: u64,
        /// The amount charged.
        paid: u64,
    },
}

/// An order's state, folded from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Where confirmations go, once placed.
    pub email: Option<String>,
    /// Total in cents.
    pub total: u64,
    /// Whether it is paid.
    pub paid: bool,
}

impl Aggregate for Order {
    const CATEGORY: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn decide(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        match command {
            OrderCommand::Place { .. } if self.email.is_some() => Err(OrderError::AlreadyPlaced),
            OrderCommand::Place { items, .. } if items.is_empty() => Err(OrderError::Empty),
            OrderCommand::Place {
                email,
                items,
                total,
            } => Ok(vec![OrderEvent::Placed {
                email,
                items,
                total,
            }]),
            OrderCommand::RecordPayment { .. } if self.email.is_none() => {
                Err(OrderError::NotPlaced)
            }
            OrderCommand::RecordPayment { .. } if self.paid => Err(OrderError::AlreadyPaid),
            OrderCommand::RecordPayment { amount, .. } if amount != self.total => {
                Err(OrderError::WrongAmount {
                    total: self.total,
                    paid: amount,
                })
            }
            OrderCommand::RecordPayment { amount, payment } => {
                Ok(vec![OrderEvent::Paid { amount, payment }])
            }
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Placed { email, total, .. } => {
                self.email = Some(email.clone());
                self.total = *total;
            }
            OrderEvent::Paid { .. } => self.paid = true,
        }
    }
}

/// The order id of an order stream (`order-1001` -> `1001`).
pub fn order_id(stream: &str) -> &str {
    stream.strip_prefix("order-").unwrap_or(stream)
}

/// Cents as `12.34`.
pub fn money(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// Prints one attempt of a reactor, so the example shows what happens.
fn report(reactor: &str, stream: &str, ctx: &EffectContext, outcome: &Result<(), ReactError>) {
    let what = match outcome {
        Ok(()) => "ok".to_owned(),
        Err(ReactError::Retry(e)) => format!("{e} -> transient, retried with backoff"),
        Err(ReactError::Fatal(e)) => format!("{e} -> permanent, parked as a dead letter"),
    };
    println!("  [{reactor}] {stream} attempt {}: {what}", ctx.attempt);
}

/// Charges the payment provider for each placed order, then records the
/// payment on the order.
pub struct ChargePayment<S> {
    provider: SocketAddr,
    orders: Repository<Order, S>,
}

impl<S> ChargePayment<S> {
    /// Charges through the provider at `provider`, records on `orders`.
    pub fn new(provider: SocketAddr, orders: Repository<Order, S>) -> Self {
        ChargePayment { provider, orders }
    }
}

// ANCHOR: charge_payment
#[async_trait::async_trait]
impl<S: EventStore + Clone> Reactor for ChargePayment<S> {
    type Event = OrderEvent;

    fn name(&self) -> &str {
        "payments"
    }

    async fn react(
        &self,
        event: &Recorded<OrderEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let OrderEvent::Placed { total, .. } = &event.event else {
            return Ok(());
        };
        let order = order_id(&event.stream);
        let body = format!("charge order {order}: {}", money(*total));
        let outcome = classify(
            post(
                self.provider,
                "/payments",
                &ctx.idempotency_key,
                body.as_bytes(),
            )
            .await,
        );
        report(self.name(), &event.stream, ctx, &outcome);
        outcome?;
        // Recorded with a command id derived from the idempotency key: a
        // retry (after a crash right here) records the same payment once.
        let command_id = Uuid::parse_str(&ctx.idempotency_key).map_err(ReactError::fatal)?;
        let meta = CommandMeta::with_id(command_id)
            .correlation(ctx.correlation_id)
            .causation(ctx.event_id);
        let command = OrderCommand::RecordPayment {
            amount: *total,
            payment: ctx.idempotency_key.clone(),
        };
        match self.orders.execute_with(order, command, meta).await {
            Ok(_) | Err(ExecuteError::Rejected(OrderError::AlreadyPaid)) => Ok(()),
            Err(ExecuteError::Rejected(e)) => Err(ReactError::fatal(e)),
            Err(e) => Err(ReactError::retry(e)),
        }
    }
}
// ANCHOR_END: charge_payment

/// Mails the customer when an order is paid.
pub struct ConfirmationMail<S> {
    provider: SocketAddr,
    orders: Repository<Order, S>,
}

impl<S> ConfirmationMail<S> {
    /// Mails through the provider at `provider`; reads addresses from `orders`.
    pub fn new(provider: SocketAddr, orders: Repository<Order, S>) -> Self {
        ConfirmationMail { provider, orders }
    }
}

#[async_trait::async_trait]
impl<S: EventStore + Clone> Reactor for ConfirmationMail<S> {
    type Event = OrderEvent;

    fn name(&self) -> &str {
        "confirmation-mail"
    }

    async fn react(
        &self,
        event: &Recorded<OrderEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let OrderEvent::Paid { amount, .. } = &event.event else {
            return Ok(());
        };
        let order = order_id(&event.stream);
        let loaded = self.orders.load(order).await.map_err(ReactError::retry)?;
        let email = loaded.state.email.unwrap_or_default();
        let body = format!(
            "to {email}: thank you, order {order} is paid ({})",
            money(*amount)
        );
        let outcome = classify(
            post(
                self.provider,
                "/mail",
                &ctx.idempotency_key,
                body.as_bytes(),
            )
            .await,
        );
        report(self.name(), &event.stream, ctx, &outcome);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aftermath::testing::AggregateTest;

    fn placed() -> OrderEvent {
        OrderEvent::Placed {
            email: "ann@example.com".into(),
            items: vec!["tea".into()],
            total: 450,
        }
    }

    #[test]
    fn places_once_and_not_empty() {
        AggregateTest::<Order>::given_nothing()
            .when(OrderCommand::Place {
                email: "ann@example.com".into(),
                items: vec!["tea".into()],
                total: 450,
            })
            .then([placed()]);
        AggregateTest::<Order>::given([placed()])
            .when(OrderCommand::Place {
                email: "bob@example.com".into(),
                items: vec!["cake".into()],
                total: 300,
            })
            .then_error(OrderError::AlreadyPlaced);
        AggregateTest::<Order>::given_nothing()
            .when(OrderCommand::Place {
                email: "ann@example.com".into(),
                items: vec![],
                total: 0,
            })
            .then_error(OrderError::Empty);
    }

    #[test]
    fn is_paid_once_with_the_right_amount() {
        let pay = |amount| OrderCommand::RecordPayment {
            amount,
            payment: "p-1".into(),
        };
        let state = AggregateTest::<Order>::given([placed()])
            .when(pay(450))
            .then([OrderEvent::Paid {
                amount: 450,
                payment: "p-1".into(),
            }]);
        assert!(state.paid);
        AggregateTest::<Order>::given([placed()])
            .when(pay(449))
            .then_error(OrderError::WrongAmount {
                total: 450,
                paid: 449,
            });
        AggregateTest::<Order>::given([
            placed(),
            OrderEvent::Paid {
                amount: 450,
                payment: "p-1".into(),
            },
        ])
        .when(pay(450))
        .then_error(OrderError::AlreadyPaid);
        AggregateTest::<Order>::given_nothing()
            .when(pay(450))
            .then_error(OrderError::NotPlaced);
    }

    #[test]
    fn helpers() {
        assert_eq!(order_id("order-1001"), "1001");
        assert_eq!(money(5_990), "59.90");
        assert_eq!(money(7), "0.07");
    }
}
