//! The outside world: a carrier that picks up parcels (and calls back), and
//! the customer's mailbox. Both are fakes standing in for HTTP services, and
//! both deduplicate by the idempotency key, as a real provider does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aftermath::reactor::{EffectContext, ReactError, Reactor};
use aftermath::{CommandMeta, EventStore, Recorded, Repository};
use uuid::Uuid;

use super::aggregates::*;

/// A pickup booked with the carrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    /// The order.
    pub order: String,
    /// Where to.
    pub address: String,
    /// Whether the carrier has called back.
    pub confirmed: bool,
    /// Our reference the carrier echoes in its webhook: the conversation
    /// and the event that booked, so the confirmation joins the timeline.
    pub reference: (Uuid, Uuid),
}

/// The carrier's API (fake): bookings by idempotency key.
#[derive(Debug, Clone, Default)]
pub struct Carrier {
    bookings: Arc<Mutex<BTreeMap<String, Booking>>>,
}

impl Carrier {
    /// An empty carrier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Books a pickup; a repeat with the same key changes nothing.
    pub fn book(&self, key: &str, order: &str, address: &str, reference: (Uuid, Uuid)) {
        self.bookings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_owned())
            .or_insert_with(|| Booking {
                order: order.to_owned(),
                address: address.to_owned(),
                confirmed: false,
                reference,
            });
    }

    /// Every booking made.
    pub fn bookings(&self) -> Vec<Booking> {
        self.bookings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The carrier's webhook: confirms every pickup it can make (all but
    /// address `"unreachable"`) by executing `Shipping::Confirm`, with a
    /// command id derived from the booking, so a repeated webhook is a no-op.
    /// Returns how many were confirmed now.
    pub async fn call_back<S: EventStore + Clone>(
        &self,
        shipping: &Repository<Shipping, S>,
    ) -> usize {
        let due: Vec<(String, Booking)> = self
            .bookings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, b)| !b.confirmed && b.address != "unreachable")
            .map(|(k, b)| (k.clone(), b.clone()))
            .collect();
        let mut confirmed = 0;
        for (key, booking) in due {
            let command_id = Uuid::new_v5(&Uuid::NAMESPACE_OID, key.as_bytes());
            let (correlation, causation) = booking.reference;
            let meta = CommandMeta::with_id(command_id)
                .correlation(correlation)
                .causation(causation);
            // A refusal (the shipment was cancelled meanwhile) is an answer too.
            if shipping
                .execute_with(&booking.order, ShippingCommand::Confirm, meta)
                .await
                .is_ok()
            {
                confirmed += 1;
            }
            if let Some(b) = self
                .bookings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&key)
            {
                b.confirmed = true;
            }
        }
        confirmed
    }
}

/// Books the pickup when a shipment is requested.
pub struct CarrierBooking {
    /// The carrier's API client.
    pub carrier: Carrier,
}

#[async_trait::async_trait]
impl Reactor for CarrierBooking {
    type Event = ShippingEvent;

    fn name(&self) -> &str {
        "carrier-booking"
    }

    async fn react(
        &self,
        event: &Recorded<ShippingEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        if let ShippingEvent::Requested { order, address } = &event.event {
            self.carrier.book(
                &ctx.idempotency_key,
                order,
                address,
                (ctx.correlation_id, ctx.event_id),
            );
        }
        Ok(())
    }
}

/// A mail sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// To whom.
    pub to: String,
    /// What it says.
    pub subject: String,
}

/// The mail provider (fake): messages by idempotency key.
#[derive(Debug, Clone, Default)]
pub struct Mailbox {
    sent: Arc<Mutex<BTreeMap<String, Mail>>>,
}

impl Mailbox {
    /// An empty mailbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every mail sent, once each.
    pub fn sent(&self) -> Vec<Mail> {
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Tells the customer how their order ended.
pub struct CustomerMail {
    /// The mail provider's client.
    pub mailbox: Mailbox,
}

#[async_trait::async_trait]
impl Reactor for CustomerMail {
    type Event = OrderEvent;

    fn name(&self) -> &str {
        "customer-mail"
    }

    async fn react(
        &self,
        event: &Recorded<OrderEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let mail = match &event.event {
            OrderEvent::Confirmed { order, customer } => Mail {
                to: customer.clone(),
                subject: format!("Your order {order} is on its way"),
            },
            OrderEvent::Cancelled {
                order,
                customer,
                reason,
            } => Mail {
                to: customer.clone(),
                subject: format!("Your order {order} was cancelled: {reason}"),
            },
            OrderEvent::Placed { .. } => return Ok(()),
        };
        self.mailbox
            .sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ctx.idempotency_key.clone())
            .or_insert(mail);
        Ok(())
    }
}
