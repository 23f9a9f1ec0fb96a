//! The timeline of a correlation id: every event of the conversation across
//! all streams (aggregate events, and the process records: inputs,
//! commands, rejections, compensations, deadlines, completion) with the
//! reactors' effects, ordered, with what caused what.

use std::collections::HashMap;
use std::fmt;

use uuid::Uuid;

use super::input::CommandSpec;
use super::record::{InputRecord, ProcessRecord};
use crate::event::{Event, StoredEvent};
use crate::reactor::{Effect, EffectJournal};
use crate::store::{EventStore, StoreError};

/// Events read per query while building a timeline.
const PAGE: usize = 500;

/// One line of a [`Timeline`].
// A timeline is read once and printed; boxing would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum TimelineEntry {
    /// An event of the conversation, in `$all` order.
    Event {
        /// The event.
        event: StoredEvent,
        /// The process record it is, when it is one.
        record: Option<ProcessRecord>,
        /// How many causes it has inside this timeline (0 = a root).
        depth: usize,
        /// Position of its cause, when the cause is in this timeline.
        caused_by: Option<crate::event::Position>,
    },
    /// A reactor's effect for the event before it.
    Effect {
        /// The journal entry.
        effect: Effect,
        /// The depth of its event + 1.
        depth: usize,
    },
}

/// Everything that happened under one correlation id. `Display` prints it
/// as an indented tree (each line under its cause).
#[derive(Debug, Clone)]
pub struct Timeline {
    /// The correlation id.
    pub correlation_id: Uuid,
    /// Events and effects, in order.
    pub entries: Vec<TimelineEntry>,
}

impl Timeline {
    /// The events, in order.
    pub fn events(&self) -> impl Iterator<Item = &StoredEvent> {
        self.entries.iter().filter_map(|e| match e {
            TimelineEntry::Event { event, .. } => Some(event),
            TimelineEntry::Effect { .. } => None,
        })
    }

    /// The process records, in order.
    pub fn records(&self) -> impl Iterator<Item = &ProcessRecord> {
        self.entries.iter().filter_map(|e| match e {
            TimelineEntry::Event {
                record: Some(r), ..
            } => Some(r),
            _ => None,
        })
    }

    /// The effects, in order.
    pub fn effects(&self) -> impl Iterator<Item = &Effect> {
        self.entries.iter().filter_map(|e| match e {
            TimelineEntry::Effect { effect, .. } => Some(effect),
            TimelineEntry::Event { .. } => None,
        })
    }
}

/// Builds the timeline of `correlation_id` from `store` (events) and
/// `journal` (reactor effects; for SQLite and PostgreSQL the same store).
pub async fn timeline<S, J>(
    store: &S,
    journal: &J,
    correlation_id: Uuid,
) -> Result<Timeline, StoreError>
where
    S: EventStore + ?Sized,
    J: EffectJournal + ?Sized,
{
    let mut events = Vec::new();
    let mut after = crate::event::Position::ORIGIN;
    loop {
        let page = store.read_correlation(correlation_id, after, PAGE).await?;
        let short = page.len() < PAGE;
        if let Some(last) = page.last() {
            after = last.position;
        }
        events.extend(page);
        if short {
            break;
        }
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let mut effects: HashMap<Uuid, Vec<Effect>> = HashMap::new();
    for effect in journal.effects_for(&ids).await? {
        effects.entry(effect.event_id).or_default().push(effect);
    }
    let mut depth_of: HashMap<Uuid, (usize, crate::event::Position)> = HashMap::new();
    let mut entries = Vec::with_capacity(events.len());
    for event in events {
        let cause = event.metadata.causation_id;
        let parent = if cause != event.id {
            depth_of.get(&cause).copied()
        } else {
            None
        };
        let depth = parent.map_or(0, |(d, _)| d + 1);
        depth_of.insert(event.id, (depth, event.position));
        let record = ProcessRecord::decode(&event.event_type, &event.payload)
            .ok()
            .flatten();
        let id = event.id;
        entries.push(TimelineEntry::Event {
            event,
            record,
            depth,
            caused_by: parent.map(|(_, p)| p),
        });
        for effect in effects.remove(&id).unwrap_or_default() {
            entries.push(TimelineEntry::Effect {
                effect,
                depth: depth + 1,
            });
        }
    }
    Ok(Timeline {
        correlation_id,
        entries,
    })
}

fn command(c: &CommandSpec) -> String {
    format!("{}-{} {}", c.target, c.id, c.command)
}

/// One line about process record `record` (stored as `event`), as the
/// timeline prints it: `<instance stream> sent COMPENSATION payment-o-2 ...`,
/// `<instance stream> received REJECTION of ...`, `<instance stream> PARKED: ...`.
pub fn describe_record(event: &StoredEvent, record: &ProcessRecord) -> String {
    let instance = event.stream.as_str();
    match record {
        ProcessRecord::Received { input } => match input {
            InputRecord::Event {
                event_type, stream, ..
            } => format!("{instance} received {event_type} from {stream}"),
            InputRecord::Rejected { rejection, .. } => format!(
                "{instance} received REJECTION of {}: {}",
                command(&rejection.command),
                rejection.error
            ),
            InputRecord::Deadline { deadline, .. } => format!(
                "{instance} received DEADLINE `{}` (due {})",
                deadline.name,
                deadline.due_at.format("%Y-%m-%d %H:%M:%S")
            ),
        },
        ProcessRecord::CommandSent {
            command: c,
            compensation,
        } => format!(
            "{instance} sent {}{}",
            if *compensation { "COMPENSATION " } else { "" },
            command(c)
        ),
        ProcessRecord::CompensationRegistered { command: c } => {
            format!("{instance} registered undo {}", command(c))
        }
        ProcessRecord::Compensating { steps } => {
            format!("{instance} compensating {steps} step(s), newest first")
        }
        ProcessRecord::DeadlineSet { name, due_at, .. } => format!(
            "{instance} set deadline `{name}` for {}",
            due_at.format("%Y-%m-%d %H:%M:%S")
        ),
        ProcessRecord::DeadlineCancelled { name, .. } => {
            format!("{instance} cancelled deadline `{name}`")
        }
        ProcessRecord::Completed {} => format!("{instance} COMPLETED"),
        ProcessRecord::Parked { error, .. } => format!("{instance} PARKED: {error}"),
        ProcessRecord::Held { input, .. } => format!("{instance} held input {}", input.id()),
        ProcessRecord::Released { skip, .. } => format!(
            "{instance} released by an operator ({})",
            if *skip { "skip" } else { "retry" }
        ),
    }
}

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "timeline of correlation {}", self.correlation_id)?;
        let mut previous = None;
        for entry in &self.entries {
            match entry {
                TimelineEntry::Event {
                    event,
                    record,
                    depth,
                    caused_by,
                } => {
                    let text = match record {
                        Some(r) => describe_record(event, r),
                        None => format!(
                            "{} {} {}",
                            event.stream,
                            event.event_type,
                            String::from_utf8_lossy(&event.payload)
                        ),
                    };
                    // Name the cause when it is not the line above.
                    let by = match caused_by {
                        Some(p) if Some(*p) != previous => format!("   (caused by {})", p.0),
                        _ => String::new(),
                    };
                    writeln!(
                        f,
                        "{:>8}  {}{}{}{}",
                        event.position.0,
                        "  ".repeat(*depth),
                        if *depth > 0 { "└ " } else { "" },
                        text,
                        by
                    )?;
                    previous = Some(event.position);
                }
                TimelineEntry::Effect { effect, depth } => {
                    writeln!(
                        f,
                        "{:>8}  {}└ effect {}: {:?} after {} attempt(s){}",
                        "",
                        "  ".repeat(*depth),
                        effect.reactor,
                        effect.state,
                        effect.attempts,
                        effect
                            .last_error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    )?;
                }
            }
        }
        Ok(())
    }
}
