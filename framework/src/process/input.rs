//! What a process instance receives: events, rejections of its commands,
//! and its deadlines.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::event::Recorded;

/// Which instance an event goes to, and how.
///
/// The lenient variants never fail; the strict ones park the instance with
/// the input (or skip the event, see
/// [`ProcessOptions::skip_misrouted`](super::ProcessOptions)), with an error
/// naming the event, when the instance is not in the expected state. Events
/// for a completed instance are ignored whatever the route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not for this process.
    Ignore,
    /// Starts the instance, or continues it if it exists.
    Start(String),
    /// Starts the instance; an error if it already exists.
    StartStrict(String),
    /// Continues the instance; ignored if it does not exist.
    Continue(String),
    /// Continues the instance; an error if it does not exist.
    ContinueStrict(String),
    /// Continues the instance, then completes it; ignored if it does not exist.
    Stop(String),
    /// Continues the instance, then completes it; an error if it does not exist.
    StopStrict(String),
}

impl Route {
    /// The instance routed to, if any.
    pub fn instance(&self) -> Option<&str> {
        match self {
            Route::Ignore => None,
            Route::Start(i)
            | Route::StartStrict(i)
            | Route::Continue(i)
            | Route::ContinueStrict(i)
            | Route::Stop(i)
            | Route::StopStrict(i) => Some(i),
        }
    }

    /// Whether the instance may be created by this event.
    pub fn starts(&self) -> bool {
        matches!(self, Route::Start(_) | Route::StartStrict(_))
    }

    /// Whether the instance completes after handling this event.
    pub fn stops(&self) -> bool {
        matches!(self, Route::Stop(_) | Route::StopStrict(_))
    }
}

/// One input of a process instance. `handle` and `apply` see every kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Input<I> {
    /// An event from the log, decoded into the process's input type.
    Event(Recorded<I>),
    /// A command this instance sent was refused by its aggregate.
    Rejected(Rejection),
    /// A deadline this instance set is due.
    Deadline(DeadlineReached),
}

impl<I> Input<I> {
    /// The event, if this input is one.
    pub fn event(&self) -> Option<&I> {
        match self {
            Input::Event(e) => Some(&e.event),
            _ => None,
        }
    }

    /// The rejection, if this input is one.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Input::Rejected(r) => Some(r),
            _ => None,
        }
    }

    /// The deadline's name, if this input is a deadline.
    pub fn deadline(&self) -> Option<&str> {
        match self {
            Input::Deadline(d) => Some(&d.name),
            _ => None,
        }
    }
}

/// A command addressed to an aggregate, as recorded in an instance's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandSpec {
    /// The aggregate's category ([`Aggregate::CATEGORY`]).
    pub target: String,
    /// The aggregate's id.
    pub id: String,
    /// The command, as JSON.
    pub command: serde_json::Value,
}

impl CommandSpec {
    /// Whether it is addressed to aggregate type `A`.
    pub fn is<A: Aggregate>(&self) -> bool {
        self.target == A::CATEGORY
    }

    /// The command as `A`'s command type (`None` when addressed to another
    /// aggregate type or when it does not decode as one).
    pub fn command<A: Aggregate>(&self) -> Option<A::Command>
    where
        A::Command: serde::de::DeserializeOwned,
    {
        if !self.is::<A>() {
            return None;
        }
        serde_json::from_value(self.command.clone()).ok()
    }
}

/// A command the target aggregate refused (its `decide` returned an error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// The command's id.
    pub command_id: Uuid,
    /// What was sent, and where.
    pub command: CommandSpec,
    /// Whether it was a compensation.
    pub compensation: bool,
    /// The aggregate's error, as text.
    pub error: String,
}

impl Rejection {
    /// Whether the refused command was addressed to aggregate type `A`.
    pub fn is<A: Aggregate>(&self) -> bool {
        self.command.is::<A>()
    }

    /// The refused command as `A`'s command type (`None` when it was
    /// addressed to another aggregate type), to branch on what was refused:
    ///
    /// ```ignore
    /// Input::Rejected(r) => match r.command::<Payment>() {
    ///     // The charge was declined: undo the earlier steps and finish.
    ///     Some(PaymentCommand::Charge { .. }) => { out.compensate(); out.complete(); }
    ///     // A refund was refused: try again in an hour.
    ///     Some(PaymentCommand::Refund) => out.set_deadline_after("refund", Duration::hours(1)),
    ///     None => {}
    /// },
    /// ```
    pub fn command<A: Aggregate>(&self) -> Option<A::Command>
    where
        A::Command: serde::de::DeserializeOwned,
    {
        self.command.command::<A>()
    }
}

/// A deadline that is due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadlineReached {
    /// The deadline's id (unique per setting).
    pub id: Uuid,
    /// The name it was set under.
    pub name: String,
    /// When it was due.
    pub due_at: DateTime<Utc>,
}
