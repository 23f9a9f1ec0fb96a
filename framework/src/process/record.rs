//! What an instance's stream holds: the inputs it handled and the outputs it
//! decided, appended together, one append per input.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::input::{CommandSpec, DeadlineReached, Input, Rejection};
use crate::event::{DecodeError, Event, Metadata, Position, StoredEvent};

/// One fact in a process instance's stream. The type names start with
/// `aftermath.process.`; they are stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::Event)]
#[event(prefix = "aftermath.process")]
pub enum ProcessRecord {
    /// An input was handled; the outputs decided follow it in the same append.
    #[event(name = "Received")]
    Received {
        /// The input.
        input: InputRecord,
    },
    /// A command to an aggregate. The record's event id is the command's id.
    #[event(name = "CommandSent")]
    CommandSent {
        /// What and where.
        command: CommandSpec,
        /// Whether it undoes an earlier step.
        compensation: bool,
    },
    /// The command that undoes a step that succeeded, kept until the process
    /// asks for compensation.
    #[event(name = "CompensationRegistered")]
    CompensationRegistered {
        /// The undo command.
        command: CommandSpec,
    },
    /// The process asked for compensation: the registered commands follow,
    /// newest first, as `CommandSent { compensation: true }`.
    #[event(name = "Compensating")]
    Compensating {
        /// How many commands follow.
        steps: u32,
    },
    /// A durable timer.
    #[event(name = "DeadlineSet")]
    DeadlineSet {
        /// Unique per setting; the deadline input's id when it fires.
        id: Uuid,
        /// Its name; setting a name again replaces the earlier deadline.
        name: String,
        /// When it is due.
        due_at: DateTime<Utc>,
    },
    /// A timer that will not fire.
    #[event(name = "DeadlineCancelled")]
    DeadlineCancelled {
        /// The cancelled setting.
        id: Uuid,
        /// Its name.
        name: String,
    },
    /// The instance is finished: later inputs are ignored.
    #[event(name = "Completed")]
    Completed {},
    /// The instance is parked: handling `input` (or dispatching command
    /// `command`) failed permanently, panicked or timed out. Nothing of the
    /// instance runs until an operator releases it (`Released`); its later
    /// inputs are recorded as `Held` and handled, in order, after the
    /// release. Other instances go on.
    #[event(name = "Parked")]
    Parked {
        /// The input that failed (not handled: no `Received` for it).
        input: Option<InputRecord>,
        /// Whether `input` came by a stopping route.
        stop: bool,
        /// The `CommandSent` record (its event id = the command id) whose
        /// dispatch failed.
        command: Option<Uuid>,
        /// The version the parking starts at: the failed `CommandSent`
        /// record, or this record itself. Records of the stream from there
        /// on are passed over until the release.
        from_version: u64,
        /// What went wrong (a panic's message, the error, the timeout).
        error: String,
    },
    /// An input that reached a parked instance: handled after the release.
    #[event(name = "Held")]
    Held {
        /// The input.
        input: InputRecord,
        /// Whether it came by a stopping route.
        stop: bool,
    },
    /// An operator released the parking that starts at `from_version`:
    /// the runner handles the parked input again (or dispatches the parked
    /// command again), unless `skip`, then carries out what was passed over
    /// and handles the held inputs, in stream order.
    #[event(name = "Released")]
    Released {
        /// The parking's `from_version`.
        from_version: u64,
        /// The version of the `Parked` record.
        parked_version: u64,
        /// Give up the parked input or command instead of retrying it.
        skip: bool,
    },
}

/// The types a runner reads back from its own streams to dispatch them.
pub(crate) const DISPATCHED_TYPES: &[&str] = &[
    "aftermath.process.CommandSent",
    "aftermath.process.DeadlineSet",
    "aftermath.process.DeadlineCancelled",
    "aftermath.process.Completed",
    "aftermath.process.Released",
];

/// A handled input as stored: enough to fold it again without the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum InputRecord {
    /// An event of the log.
    Event {
        /// Its id (the input id).
        id: Uuid,
        /// Where it is.
        stream: String,
        /// Its version there.
        version: u64,
        /// Its `$all` position.
        position: u64,
        /// When it was recorded.
        recorded_at: DateTime<Utc>,
        /// Its type name.
        event_type: String,
        /// Its payload.
        payload: serde_json::Value,
        /// Its metadata.
        metadata: Metadata,
        /// When the runner handled it (by its clock).
        at: DateTime<Utc>,
    },
    /// A refused command (input id derived from the command id).
    Rejected {
        /// Input id.
        id: Uuid,
        /// When the rejection was seen.
        at: DateTime<Utc>,
        /// The rejection.
        rejection: Rejection,
    },
    /// A deadline (input id = the deadline's id).
    Deadline {
        /// The deadline.
        deadline: DeadlineReached,
        /// When the runner delivered it (by its clock).
        at: DateTime<Utc>,
    },
}

impl InputRecord {
    /// The input's id.
    pub fn id(&self) -> Uuid {
        match self {
            InputRecord::Event { id, .. } | InputRecord::Rejected { id, .. } => *id,
            InputRecord::Deadline { deadline, .. } => deadline.id,
        }
    }

    /// What the records of this input were caused by: the event, the
    /// refused command (its `CommandSent` record), the `DeadlineSet` record.
    pub fn cause(&self) -> Uuid {
        match self {
            InputRecord::Event { id, .. } => *id,
            InputRecord::Rejected { rejection, .. } => rejection.command_id,
            InputRecord::Deadline { deadline, .. } => deadline.id,
        }
    }

    /// The input's time (recorded, so a reload sees the same): when the
    /// runner handled it by its clock, or for a deadline its due time.
    /// Outputs computed from "now" use it, so `handle` stays pure.
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            InputRecord::Event { at, .. }
            | InputRecord::Rejected { at, .. }
            | InputRecord::Deadline { at, .. } => *at,
        }
    }

    /// Records an event of the log handled at `at`.
    pub fn of_event(stored: &StoredEvent, at: DateTime<Utc>) -> Result<Self, String> {
        let payload = serde_json::from_slice(&stored.payload)
            .map_err(|e| format!("payload is not JSON: {e}"))?;
        Ok(InputRecord::Event {
            id: stored.id,
            stream: stored.stream.clone(),
            version: stored.version,
            position: stored.position.0,
            recorded_at: stored.recorded_at,
            event_type: stored.event_type.clone(),
            payload,
            metadata: stored.metadata.clone(),
            at,
        })
    }

    /// The typed input. `upcast` brings a copied event to its current shape
    /// (the store's upcasters: [`EventStore::upcast`](crate::EventStore::upcast)).
    pub fn decode<I: Event>(
        &self,
        upcast: &dyn Fn(&mut StoredEvent) -> Result<(), DecodeError>,
    ) -> Result<Input<I>, String> {
        match self {
            InputRecord::Event {
                id,
                stream,
                version,
                position,
                recorded_at,
                event_type,
                payload,
                metadata,
                ..
            } => {
                let mut stored = StoredEvent {
                    id: *id,
                    stream: stream.clone(),
                    version: *version,
                    position: Position(*position),
                    recorded_at: *recorded_at,
                    event_type: event_type.clone(),
                    payload: serde_json::to_vec(payload).map_err(|e| e.to_string())?,
                    metadata: metadata.clone(),
                };
                upcast(&mut stored).map_err(|e| e.to_string())?;
                let event = stored
                    .decode::<I>()
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!(
                            "event type `{}` is not one of the process's inputs",
                            stored.event_type
                        )
                    })?;
                Ok(Input::Event(event))
            }
            InputRecord::Rejected { rejection, .. } => Ok(Input::Rejected(rejection.clone())),
            InputRecord::Deadline { deadline, .. } => Ok(Input::Deadline(deadline.clone())),
        }
    }
}

const NAMESPACE: Uuid = Uuid::from_u128(0x3b0c_5e1d_8f2a_4c67_9d13_a5e0_7b42_c18f);

fn derive(parts: &[&[u8]]) -> Uuid {
    let mut name = Vec::new();
    for part in parts {
        name.extend_from_slice(&(part.len() as u64).to_be_bytes());
        name.extend_from_slice(part);
    }
    Uuid::new_v5(&NAMESPACE, &name)
}

/// The id of the `index`-th record appended for `input_id` by `instance` of
/// `process`. For a `CommandSent` record it is the command's id, so a
/// re-dispatch after a crash carries the same id and the target's
/// idempotent append absorbs it.
pub fn record_id(process: &str, instance: &str, input_id: Uuid, index: usize) -> Uuid {
    derive(&[
        process.as_bytes(),
        instance.as_bytes(),
        input_id.as_bytes(),
        &(index as u64).to_be_bytes(),
    ])
}

/// The id of a `Parked`, `Held` or `Released` record (`kind`) appended to
/// `instance` of `process` at `version`: the same on a repeated append, so
/// a retry after a lost reply is recognised as a duplicate.
pub fn control_id(process: &str, instance: &str, kind: &str, version: u64) -> Uuid {
    derive(&[
        b"control",
        kind.as_bytes(),
        process.as_bytes(),
        instance.as_bytes(),
        &version.to_be_bytes(),
    ])
}

/// The input id of the rejection of command `command_id`.
pub fn rejection_id(command_id: Uuid) -> Uuid {
    derive(&[b"rejected", command_id.as_bytes()])
}

/// The correlation id of an instance started without one.
pub fn instance_uuid(process: &str, instance: &str) -> Uuid {
    derive(&[b"instance", process.as_bytes(), instance.as_bytes()])
}

/// The stream of `instance` of `process`: `<process>.process-<instance>`.
pub fn stream_of(process: &str, instance: &str) -> String {
    format!("{process}.process-{instance}")
}

/// The instance a stream belongs to, if it is one of `process`'s.
pub fn instance_of<'a>(process: &str, stream: &'a str) -> Option<&'a str> {
    stream.strip_prefix(process)?.strip_prefix(".process-")
}

/// Checks a process name: not empty, and without the `.process-` separator
/// (a name containing it could claim another process's streams).
pub fn check_name(process: &str) -> Result<(), String> {
    if process.is_empty() {
        return Err("a process name must not be empty".into());
    }
    if process.contains(".process-") {
        return Err(format!(
            "process name `{process}` contains `.process-`, the separator of instance stream names"
        ));
    }
    if process.starts_with('$') {
        return Err(format!(
            "process name `{process}` starts with `$`, reserved for the store"
        ));
    }
    Ok(())
}
