//! The few server calls the store makes, behind a trait: the `kurrentdb`
//! client implements it for real, and the unit tests run the whole store on
//! an in-memory stand-in (`fake.rs`) that answers like a server would.

use ::kurrentdb::{
    AppendToStreamOptions, Client, ReadAllOptions, ReadStreamOptions, ResolvedEvent,
    StreamMetadata, StreamPosition, StreamState, SubscribeToAllOptions, Subscription,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use uuid::Uuid;

use super::mapping::ServerFilter;

/// An event as the server stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rec {
    /// The server's stream name.
    pub(crate) stream: String,
    pub(crate) id: Uuid,
    /// 0-based.
    pub(crate) revision: u64,
    /// The server's type name.
    pub(crate) event_type: String,
    pub(crate) data: Vec<u8>,
    /// The event's (user) metadata bytes.
    pub(crate) metadata: Vec<u8>,
    pub(crate) commit: u64,
    pub(crate) prepare: u64,
    pub(crate) created: DateTime<Utc>,
}

impl Rec {
    /// The client's `$all` position of this event.
    pub(crate) fn position(&self) -> ::kurrentdb::Position {
        ::kurrentdb::Position {
            commit: self.commit,
            prepare: self.prepare,
        }
    }
}

/// An event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Proposed {
    pub(crate) id: Uuid,
    /// The server's type name.
    pub(crate) event_type: String,
    /// Stored with the JSON content type when it is JSON, else as binary.
    pub(crate) data: Vec<u8>,
    /// Empty for none.
    pub(crate) metadata: Vec<u8>,
}

/// The server calls of the store. Errors are the client's own values, so
/// that the store maps the same errors whatever answers.
#[async_trait]
pub(crate) trait Server: Send + Sync + 'static {
    /// Appends atomically if the stream is in state `expected`; returns the
    /// revision of the last event written.
    async fn append(
        &self,
        stream: &str,
        expected: StreamState,
        events: Vec<Proposed>,
    ) -> ::kurrentdb::Result<u64>;

    /// Up to `count` events of `stream` from `start`. A stream that does not
    /// exist is `Err(ResourceNotFound)`, a deleted one `Err(ResourceDeleted)`.
    async fn read_stream(
        &self,
        stream: &str,
        start: StreamPosition<u64>,
        backwards: bool,
        count: usize,
    ) -> ::kurrentdb::Result<Vec<Rec>>;

    /// Up to `count` events of `$all` from `start` (inclusive going
    /// forwards, exclusive going backwards) that pass `filter`.
    async fn read_all(
        &self,
        start: StreamPosition<::kurrentdb::Position>,
        backwards: bool,
        filter: &ServerFilter,
        count: usize,
    ) -> ::kurrentdb::Result<Vec<Rec>>;

    /// Sets the stream's `$maxCount`.
    async fn set_max_count(&self, stream: &str, max_count: u64) -> ::kurrentdb::Result<()>;

    /// Events of `$all` after `start` that pass `filter`, live, until the
    /// subscription fails (an `Err` item, or the end of the stream). It never
    /// resubscribes by itself.
    fn subscribe_all(
        &self,
        start: StreamPosition<::kurrentdb::Position>,
        filter: &ServerFilter,
    ) -> BoxStream<'static, ::kurrentdb::Result<Rec>>;
}

/// The real server, through the `kurrentdb` client.
pub(crate) struct ClientServer {
    pub(crate) client: Client,
}

/// The client's event: JSON payloads keep the JSON content type (so the
/// server's projections can read them) and their exact bytes; anything else
/// is stored as binary, byte for byte.
fn client_event(event: Proposed) -> ::kurrentdb::EventData {
    use serde_json::value::RawValue;
    let Proposed {
        id,
        event_type,
        data,
        metadata,
    } = event;
    // `RawValue` keeps the text as it is, except surrounding whitespace.
    let json = std::str::from_utf8(&data)
        .ok()
        .is_some_and(|text| text.trim() == text && serde_json::from_str::<&RawValue>(text).is_ok());
    let out = if json {
        let text = String::from_utf8(data).expect("checked to be UTF-8");
        let raw = RawValue::from_string(text).expect("checked to be JSON");
        ::kurrentdb::EventData::json(&event_type, &raw).expect("raw JSON serializes as itself")
    } else {
        ::kurrentdb::EventData::binary(&event_type, data.into())
    };
    let out = out.id(id);
    if metadata.is_empty() {
        out
    } else {
        out.metadata(metadata.into())
    }
}

fn rec(event: ResolvedEvent) -> ::kurrentdb::Result<Rec> {
    let Some(recorded) = event.event.or(event.link) else {
        return Err(::kurrentdb::Error::InternalParsingError(
            "a read answer without an event".to_owned(),
        ));
    };
    Ok(Rec {
        stream: recorded.stream_id().to_owned(),
        id: recorded.id,
        revision: recorded.revision,
        event_type: recorded.event_type.clone(),
        data: recorded.data.to_vec(),
        metadata: recorded.custom_metadata.to_vec(),
        commit: recorded.position.commit,
        prepare: recorded.position.prepare,
        created: recorded.created,
    })
}

#[async_trait]
impl Server for ClientServer {
    async fn append(
        &self,
        stream: &str,
        expected: StreamState,
        events: Vec<Proposed>,
    ) -> ::kurrentdb::Result<u64> {
        let events: Vec<::kurrentdb::EventData> = events.into_iter().map(client_event).collect();
        let options = AppendToStreamOptions::default().stream_state(expected);
        let written = self
            .client
            .append_to_stream(stream.to_owned(), &options, events)
            .await?;
        Ok(written.next_expected_version)
    }

    async fn read_stream(
        &self,
        stream: &str,
        start: StreamPosition<u64>,
        backwards: bool,
        count: usize,
    ) -> ::kurrentdb::Result<Vec<Rec>> {
        // `position` sets the direction for Start and End: set it after.
        let options = ReadStreamOptions::default()
            .position(start)
            .max_count(count);
        let options = if backwards {
            options.backwards()
        } else {
            options.forwards()
        };
        let mut read = self.client.read_stream(stream.to_owned(), &options).await?;
        let mut out = Vec::new();
        while let Some(event) = read.next().await? {
            out.push(rec(event)?);
        }
        Ok(out)
    }

    async fn read_all(
        &self,
        start: StreamPosition<::kurrentdb::Position>,
        backwards: bool,
        filter: &ServerFilter,
        count: usize,
    ) -> ::kurrentdb::Result<Vec<Rec>> {
        let options = ReadAllOptions::default()
            .position(start)
            .filter(filter.to_client())
            .max_count(count);
        let options = if backwards {
            options.backwards()
        } else {
            options.forwards()
        };
        let mut read = self.client.read_all(&options).await?;
        let mut out = Vec::new();
        while let Some(event) = read.next().await? {
            out.push(rec(event)?);
        }
        Ok(out)
    }

    async fn set_max_count(&self, stream: &str, max_count: u64) -> ::kurrentdb::Result<()> {
        let metadata: StreamMetadata = StreamMetadata::builder().max_count(max_count).build();
        self.client
            .set_stream_metadata(stream.to_owned(), &Default::default(), &metadata)
            .await?;
        Ok(())
    }

    fn subscribe_all(
        &self,
        start: StreamPosition<::kurrentdb::Position>,
        filter: &ServerFilter,
    ) -> BoxStream<'static, ::kurrentdb::Result<Rec>> {
        // No retry options: the client's own resubscription restarts from the
        // last event it delivered, not from our head; the store resubscribes.
        let options = SubscribeToAllOptions::default()
            .position(start)
            .filter(filter.to_client());
        enum State {
            Fresh(Box<(Client, SubscribeToAllOptions)>),
            Live(Box<Subscription>),
        }
        let state = State::Fresh(Box::new((self.client.clone(), options)));
        Box::pin(futures::stream::unfold(Some(state), |state| async move {
            let mut subscription = match state? {
                State::Fresh(fresh) => {
                    let (client, options) = *fresh;
                    client.subscribe_to_all(&options).await
                }
                State::Live(subscription) => *subscription,
            };
            match subscription.next().await {
                Ok(event) => Some((rec(event), Some(State::Live(Box::new(subscription))))),
                // The subscription is over: one error, then the end.
                Err(e) => Some((Err(e), None)),
            }
        }))
    }
}
