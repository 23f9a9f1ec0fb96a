//! A store filled through the library: two orders under one correlation id,
//! a reactor whose effect for the second order is parked (the event behind
//! it blocked), a second subscriber behind the head, a lease.

#![allow(dead_code)]

pub mod http;

use std::time::Duration;

use aftermath::reactor::{EffectContext, EffectJournal, ReactError, Reactor, ReactorRunner};
use aftermath::subscription::{CheckpointStore, Holder, LeaseStore};
use aftermath::{Event, EventData, EventStore, ExpectedVersion, Metadata, Position, Recorded};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The test's events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "order")]
pub enum OrderEvent {
    /// An order.
    Placed { items: u32 },
    /// Its confirmation.
    Confirmed {},
}

/// Sends a mail per placed order; refuses the order with 13 items.
pub struct Mailer;

#[async_trait::async_trait]
impl Reactor for Mailer {
    type Event = OrderEvent;
    fn name(&self) -> &str {
        "mailer"
    }
    async fn react(
        &self,
        event: &Recorded<OrderEvent>,
        _: &EffectContext,
    ) -> Result<(), ReactError> {
        match event.event {
            OrderEvent::Placed { items: 13 } => {
                Err(ReactError::fatal("mail service refused: unlucky order"))
            }
            _ => Ok(()),
        }
    }
}

/// What [`fill`] wrote.
pub struct Filled {
    /// The correlation id of order o-1 (placed, then confirmed).
    pub correlation: Uuid,
    /// The event whose effect is parked (order o-2 placed).
    pub parked: Uuid,
    /// The event blocked behind it (order o-2 confirmed).
    pub blocked: Uuid,
}

fn event(e: &OrderEvent, id: Uuid, correlation: Uuid, causation: Uuid) -> EventData {
    let mut meta = Metadata::caused_by(correlation);
    meta.causation_id = causation;
    EventData::encode(e, id, meta).unwrap()
}

/// Fills `store`: see the module's docs.
pub async fn fill<S>(store: &S) -> Filled
where
    S: EventStore + EffectJournal + CheckpointStore + LeaseStore + Clone,
{
    let correlation = Uuid::now_v7();
    let placed = Uuid::now_v7();
    store
        .append(
            "order-o-1",
            ExpectedVersion::NoStream,
            vec![
                event(
                    &OrderEvent::Placed { items: 2 },
                    placed,
                    correlation,
                    correlation,
                ),
                event(
                    &OrderEvent::Confirmed {},
                    Uuid::now_v7(),
                    correlation,
                    placed,
                ),
            ],
        )
        .await
        .unwrap();
    let (parked, blocked) = (Uuid::now_v7(), Uuid::now_v7());
    let other = Uuid::now_v7();
    store
        .append(
            "order-o-2",
            ExpectedVersion::NoStream,
            vec![
                event(&OrderEvent::Placed { items: 13 }, parked, other, other),
                event(&OrderEvent::Confirmed {}, blocked, other, parked),
            ],
        )
        .await
        .unwrap();
    let runner = ReactorRunner::new(Mailer, store.clone(), store.clone(), store.clone());
    runner.catch_up().await.unwrap();
    // A subscriber that stopped after the first event.
    let first = store.read_all(Position::ORIGIN, None, 1).await.unwrap()[0].position;
    store.save("audit-log", None, first, None).await.unwrap();
    store
        .acquire(
            "audit-log",
            &Holder::new("worker-7"),
            Duration::from_secs(600),
        )
        .await
        .unwrap()
        .expect("the lease is free");
    Filled {
        correlation,
        parked,
        blocked,
    }
}
