//! Integration with NATS JetStream (feature `nats`): the outbox publishes
//! integration events at least once, the inbox turns incoming messages into
//! commands exactly once in effect.
//!
//! **Outbox.** [`NatsOutbox`] is a ready [`Reactor`]: it publishes selected
//! events to JetStream with the event id as the `Nats-Msg-Id` header (so
//! JetStream drops a re-published duplicate inside the stream's duplicate
//! window), a subject chosen per event, and headers carrying the event type,
//! stream, correlation and causation ids. It waits for JetStream's publish
//! acknowledgement before the runner records the effect done; a crash in
//! between re-publishes with the same id, which JetStream drops.
//!
//! **Inbox.** [`NatsInbox`] reads a JetStream durable pull consumer and turns
//! each message into a command on an aggregate with a command id derived from
//! the message id, so a redelivered or duplicated message is absorbed by the
//! repository's command inbox. It acknowledges only after the append
//! committed (or the aggregate rejected the command, which is recorded). A
//! message that cannot be mapped to a command, or whose command is rejected
//! or can never be executed, is parked with its raw bytes and the reason in
//! an [`InboxStore`], then acknowledged: never lost, never retried forever.
//! A parked message delivered again is acknowledged without running again.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use uuid::Uuid;

use crate::aggregate::{Aggregate, CommandMeta, ExecuteError, Repository};
use crate::event::{Event, Recorded};
use crate::reactor::{EffectContext, ReactError, Reactor};
use crate::store::{EventStore, StoreError};
use crate::subscription::stopped;
use crate::worker::{RunContext, Subscriber, SubscriberError, SubscriberState};

/// Header names the outbox sets (besides `Nats-Msg-Id`).
pub mod headers {
    /// The event's type name.
    pub const EVENT_TYPE: &str = "Aftermath-Event-Type";
    /// The event's stream.
    pub const STREAM: &str = "Aftermath-Stream";
    /// The event's correlation id.
    pub const CORRELATION_ID: &str = "Aftermath-Correlation-Id";
    /// The event's causation id.
    pub const CAUSATION_ID: &str = "Aftermath-Causation-Id";
    /// JetStream's deduplication header.
    pub const MSG_ID: &str = "Nats-Msg-Id";
}

type SubjectFn<E> = dyn Fn(&Recorded<E>) -> Option<String> + Send + Sync;

/// Publishes integration events to JetStream; run it with a
/// [`ReactorRunner`](crate::reactor::ReactorRunner).
pub struct NatsOutbox<E> {
    name: String,
    jetstream: jetstream::Context,
    subject: Arc<SubjectFn<E>>,
    ack_timeout: Duration,
}

impl<E: Event> NatsOutbox<E> {
    /// An outbox named `name` publishing through `jetstream`. `subject`
    /// picks the subject of each event, or `None` to not publish it (a
    /// private event).
    pub fn new(
        name: impl Into<String>,
        jetstream: jetstream::Context,
        subject: impl Fn(&Recorded<E>) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        NatsOutbox {
            name: name.into(),
            jetstream,
            subject: Arc::new(subject),
            ack_timeout: Duration::from_secs(10),
        }
    }

    /// How long to wait for JetStream's acknowledgement (default 10 s)
    /// before treating the publish as a transient failure.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }
}

#[async_trait]
impl<E: Event> Reactor for NatsOutbox<E> {
    type Event = E;

    fn name(&self) -> &str {
        &self.name
    }

    async fn react(&self, event: &Recorded<E>, ctx: &EffectContext) -> Result<(), ReactError> {
        let Some(subject) = (self.subject)(event) else {
            return Ok(());
        };
        let payload = event.event.encode().map_err(ReactError::fatal)?;
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::MSG_ID, event.id.to_string().as_str());
        map.insert(headers::EVENT_TYPE, event.event.event_type());
        map.insert(headers::STREAM, event.stream.as_str());
        map.insert(
            headers::CORRELATION_ID,
            ctx.correlation_id.to_string().as_str(),
        );
        map.insert(headers::CAUSATION_ID, ctx.causation_id.to_string().as_str());
        let publish = async {
            let ack = self
                .jetstream
                .publish_with_headers(subject.clone(), map, payload.into())
                .await
                .map_err(ReactError::retry)?;
            ack.await.map_err(ReactError::retry)
        };
        match tokio::time::timeout(self.ack_timeout, publish).await {
            Ok(Ok(ack)) => {
                tracing::debug!(
                    subject,
                    sequence = ack.sequence,
                    duplicate = ack.duplicate,
                    "published"
                );
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ReactError::retry(format!(
                "no publish acknowledgement within {:?}",
                self.ack_timeout
            ))),
        }
    }
}

/// A message the inbox could not turn into a command, kept with its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedMessage {
    /// The inbox (consumer) name.
    pub inbox: String,
    /// The message id (`Nats-Msg-Id`, else `<stream>:<sequence>`).
    pub message_id: String,
    /// Its subject.
    pub subject: String,
    /// Its raw payload.
    pub payload: Vec<u8>,
    /// Why it was parked.
    pub error: String,
    /// When.
    pub parked_at: DateTime<Utc>,
}

/// Where an inbox parks messages it cannot handle.
#[async_trait]
pub trait InboxStore: Send + Sync + 'static {
    /// Parks a message (idempotent per inbox and message id).
    async fn park(&self, message: &ParkedMessage) -> Result<(), StoreError>;
    /// Whether a message is parked: a redelivered or re-published message
    /// that was parked before is acknowledged again, not executed again (a
    /// rejected command must not succeed on its second delivery).
    /// The default scans [`InboxStore::parked_messages`]; backends override
    /// it with a keyed lookup.
    async fn is_parked(&self, inbox: &str, message_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .parked_messages(Some(inbox))
            .await?
            .iter()
            .any(|m| m.message_id == message_id))
    }
    /// Parked messages of one inbox or all, oldest first.
    async fn parked_messages(&self, inbox: Option<&str>) -> Result<Vec<ParkedMessage>, StoreError>;
    /// Deletes parked messages older than `before`; returns how many.
    async fn cleanup_parked(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
}

/// What an inbox does with one message: which aggregate, which command.
pub type MessageMapper<A> = dyn Fn(&async_nats::Message) -> Result<(String, <A as Aggregate>::Command), String>
    + Send
    + Sync;

/// Namespace of command ids derived from message ids (uuid v5).
const INBOX_NAMESPACE: Uuid = Uuid::from_u128(0x3b8e_41f0_6c2d_4a97_8e15_d0a9_74c3_5b21);

/// The command id an inbox derives from a message id.
pub fn command_id(inbox: &str, message_id: &str) -> Uuid {
    Uuid::new_v5(&INBOX_NAMESPACE, format!("{inbox}/{message_id}").as_bytes())
}

/// Reads a JetStream durable pull consumer and executes a command per
/// message. Run it in a [`Worker`](crate::worker::Worker).
pub struct NatsInbox<A: Aggregate, S, P> {
    name: String,
    consumer: jetstream::consumer::PullConsumer,
    repository: Repository<A, S>,
    parking: P,
    map: Arc<MessageMapper<A>>,
}

impl<A, S, P> NatsInbox<A, S, P>
where
    A: Aggregate,
    A::Command: Clone,
    S: EventStore + Clone,
    P: InboxStore,
{
    /// An inbox named `name` reading `consumer` (a durable pull consumer with
    /// explicit acks), executing commands through `repository`, parking what
    /// `map` cannot turn into a command in `parking`.
    pub fn new(
        name: impl Into<String>,
        consumer: jetstream::consumer::PullConsumer,
        repository: Repository<A, S>,
        parking: P,
        map: impl Fn(&async_nats::Message) -> Result<(String, A::Command), String>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        NatsInbox {
            name: name.into(),
            consumer,
            repository,
            parking,
            map: Arc::new(map),
        }
    }

    fn error(&self, message: String) -> SubscriberError {
        SubscriberError::Store {
            subscriber: self.name.clone(),
            source: StoreError::Closed(message),
        }
    }

    /// Handles one message; returns whether to acknowledge it.
    async fn handle(&self, message: &jetstream::Message) -> Result<(), SubscriberError> {
        let message_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::MSG_ID))
            .map(|v| v.to_string())
            .or_else(|| {
                message
                    .info()
                    .ok()
                    .map(|i| format!("{}:{}", i.stream, i.stream_sequence))
            })
            .unwrap_or_else(|| format!("{}:unknown", message.subject));
        let park = |error: String| ParkedMessage {
            inbox: self.name.clone(),
            message_id: message_id.clone(),
            subject: message.subject.to_string(),
            payload: message.payload.to_vec(),
            error,
            parked_at: Utc::now(),
        };
        let store_error = |source| SubscriberError::Store {
            subscriber: self.name.clone(),
            source,
        };
        // Parked before (its ack was lost, or it was published again after
        // the duplicate window): the outcome stands; acknowledge it again.
        if self
            .parking
            .is_parked(&self.name, &message_id)
            .await
            .map_err(store_error)?
        {
            tracing::debug!(inbox = %self.name, message_id, "message was parked before; acknowledged again");
            return Ok(());
        }
        let (id, command) = match (self.map)(&message.message) {
            Ok(mapped) => mapped,
            Err(error) => {
                tracing::warn!(inbox = %self.name, message_id, error, "message does not map to a command; parked");
                return self.parking.park(&park(error)).await.map_err(store_error);
            }
        };
        let meta = CommandMeta::with_id(command_id(&self.name, &message_id))
            .extra("nats-message-id", message_id.clone());
        match self.repository.execute_with(&id, command, meta).await {
            Ok(done) => {
                tracing::debug!(inbox = %self.name, message_id, duplicate = done.duplicate, "message executed");
                Ok(())
            }
            Err(ExecuteError::Rejected(reason)) => {
                let error = format!("rejected by {} `{id}`: {reason}", A::CATEGORY);
                tracing::warn!(inbox = %self.name, message_id, error, "command rejected; parked");
                self.parking.park(&park(error)).await.map_err(store_error)
            }
            // Failures that every redelivery would repeat: the message id
            // was used before for another aggregate (its derived command id
            // is taken), or a decided event does not serialize. Parked, so
            // the message is not redelivered forever.
            Err(
                e @ (ExecuteError::Encode(_)
                | ExecuteError::Store(StoreError::DuplicateEventId { .. })),
            ) => {
                let error = format!("cannot execute on {} `{id}`: {e}", A::CATEGORY);
                tracing::warn!(inbox = %self.name, message_id, error, "message cannot be executed; parked");
                self.parking.park(&park(error)).await.map_err(store_error)
            }
            Err(e) => Err(self.error(format!("executing message {message_id}: {e}"))),
        }
    }
}

#[async_trait]
impl<A, S, P> Subscriber for NatsInbox<A, S, P>
where
    A: Aggregate,
    A::Command: Clone,
    S: EventStore + Clone,
    P: InboxStore,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, ctx: &mut RunContext) -> Result<(), SubscriberError> {
        let mut messages = self
            .consumer
            .messages()
            .await
            .map_err(|e| self.error(format!("subscribing to the consumer: {e}")))?;
        ctx.report(|s| s.state = SubscriberState::Live);
        let mut stop = ctx.shutdown.clone();
        loop {
            let next = tokio::select! {
                _ = stopped(&mut stop) => return Ok(()),
                next = messages.next() => next,
            };
            let message = match next {
                None => return Err(self.error("the consumer's message stream ended".into())),
                Some(Err(e)) => return Err(self.error(format!("receiving a message: {e}"))),
                Some(Ok(message)) => message,
            };
            // Not acknowledged on error: JetStream redelivers it, and the
            // derived command id makes the repeat harmless.
            self.handle(&message).await?;
            message
                .ack()
                .await
                .map_err(|e| self.error(format!("acknowledging a message: {e}")))?;
            ctx.report(|s| s.handled += 1);
        }
    }
}
