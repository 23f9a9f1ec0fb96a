//! One process instance: its folded state, and the pure step from an input
//! to the records one append stores.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::ProcessManager;
use super::input::{CommandSpec, Input};
use super::outputs::Outputs;
use super::record::{InputRecord, ProcessRecord, instance_uuid, record_id, stream_of};
use crate::event::{DecodeError, EncodeError, EventData, Metadata, StoredEvent};

/// A process instance as folded from its stream.
pub struct Instance<P: ProcessManager> {
    /// Its id (the routing key).
    pub id: String,
    /// The process's state, folded from every input handled.
    pub state: P::State,
    /// Its stream's version (0 = not started).
    pub version: u64,
    /// The conversation every command and record of it carries: the
    /// correlation id of the input that started it.
    pub correlation_id: Uuid,
    /// Whether it completed.
    pub completed: bool,
    handled: HashSet<Uuid>,
    /// Inputs recorded `Held` (waiting for a release).
    held: HashSet<Uuid>,
    /// Set while the instance is parked.
    pub parked: Option<Parking>,
    deadlines: BTreeMap<String, (Uuid, DateTime<Utc>)>,
    registered: Vec<CommandSpec>,
    /// The trace context of its latest record: a deadline firing continues it.
    pub(crate) trace: Option<crate::trace::TraceContext>,
}

impl<P: ProcessManager> std::fmt::Debug for Instance<P>
where
    P::State: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("version", &self.version)
            .field("completed", &self.completed)
            .field("parked", &self.parked)
            .field("deadlines", &self.deadlines)
            .field("registered", &self.registered)
            .finish()
    }
}

/// Why and where a process instance is parked (see
/// [`ProcessRecord::Parked`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Parking {
    /// The input that failed, if an input failed.
    pub input: Option<InputRecord>,
    /// Whether that input came by a stopping route.
    pub stop: bool,
    /// The command whose dispatch failed, if a dispatch failed.
    pub command: Option<Uuid>,
    /// Records from this version on are passed over until the release.
    pub from_version: u64,
    /// The version of the `Parked` record.
    pub parked_version: u64,
    /// What went wrong.
    pub error: String,
    /// Inputs held behind the parking, in order.
    pub held: usize,
}

/// What handling an input amounts to.
pub(crate) enum Decision<S> {
    /// Already handled: its records are in the stream.
    Duplicate,
    /// Not handled, with why (completed instance, cancelled deadline).
    Ignored(&'static str),
    /// Append these records (the first is `Received`), then `state` is the
    /// instance's new state.
    Append {
        records: Vec<ProcessRecord>,
        state: S,
    },
}

impl<P: ProcessManager> Instance<P> {
    /// A not-yet-started instance.
    pub fn new(id: &str) -> Self {
        Instance {
            id: id.to_owned(),
            state: P::State::default(),
            version: 0,
            correlation_id: instance_uuid(P::NAME, id),
            completed: false,
            handled: HashSet::new(),
            held: HashSet::new(),
            parked: None,
            deadlines: BTreeMap::new(),
            registered: Vec::new(),
            trace: None,
        }
    }

    /// Whether it has handled anything.
    pub fn exists(&self) -> bool {
        self.version > 0
    }

    /// Whether the input with this id was handled.
    pub fn has_handled(&self, input_id: Uuid) -> bool {
        self.handled.contains(&input_id)
    }

    /// Whether the input with this id is recorded `Held` behind a parking.
    pub fn is_held(&self, input_id: Uuid) -> bool {
        self.held.contains(&input_id)
    }

    /// The deadlines set and not yet fired or cancelled: name -> (id, due).
    pub fn deadlines(&self) -> &BTreeMap<String, (Uuid, DateTime<Utc>)> {
        &self.deadlines
    }

    /// Whether deadline `id` is still set (not fired, cancelled, replaced).
    pub fn deadline_active(&self, id: Uuid) -> bool {
        !self.completed && self.deadlines.values().any(|(d, _)| *d == id)
    }

    /// Registered compensations not sent yet, oldest first.
    pub fn compensations(&self) -> &[CommandSpec] {
        &self.registered
    }

    /// The instance's stream.
    pub fn stream(&self) -> String {
        stream_of(P::NAME, &self.id)
    }

    /// Folds one stored record (reading the log back).
    pub(crate) fn fold_stored(
        &mut self,
        process: &P,
        record: &ProcessRecord,
        metadata: &Metadata,
        version: u64,
        upcast: &dyn Fn(&mut StoredEvent) -> Result<(), DecodeError>,
    ) -> Result<(), String> {
        if self.version == 0 {
            self.correlation_id = metadata.correlation_id;
        }
        if let Some(trace) = &metadata.trace {
            self.trace = Some(trace.clone());
        }
        // After completion only rejections are recorded, without `apply`.
        if let ProcessRecord::Received { input } = record
            && !self.completed
        {
            let typed = input.decode::<P::Input>(upcast)?;
            process.apply(&mut self.state, &typed);
        }
        self.version = version;
        self.fold_meta(record);
        Ok(())
    }

    /// Folds the framework's part of a record (not the user state).
    fn fold_meta(&mut self, record: &ProcessRecord) {
        match record {
            ProcessRecord::Received { input } => {
                self.handled.insert(input.id());
                if let InputRecord::Deadline { deadline, .. } = input {
                    self.deadlines.retain(|_, (id, _)| *id != deadline.id);
                }
            }
            ProcessRecord::CommandSent { .. } => {}
            ProcessRecord::CompensationRegistered { command } => {
                self.registered.push(command.clone())
            }
            ProcessRecord::Compensating { .. } => self.registered.clear(),
            ProcessRecord::DeadlineSet { id, name, due_at } => {
                self.deadlines.insert(name.clone(), (*id, *due_at));
            }
            ProcessRecord::DeadlineCancelled { id, .. } => {
                self.deadlines.retain(|_, (d, _)| d != id)
            }
            ProcessRecord::Completed {} => {
                self.completed = true;
                self.deadlines.clear();
            }
            ProcessRecord::Parked {
                input,
                stop,
                command,
                from_version,
                error,
            } => {
                self.parked = Some(Parking {
                    input: input.clone(),
                    stop: *stop,
                    command: *command,
                    from_version: *from_version,
                    parked_version: self.version,
                    error: error.clone(),
                    held: 0,
                })
            }
            ProcessRecord::Held { input, .. } => {
                self.held.insert(input.id());
                if let Some(p) = &mut self.parked {
                    p.held += 1;
                }
            }
            ProcessRecord::Released {
                parked_version,
                skip,
                ..
            } => {
                if let Some(p) = self.parked.take_if(|p| p.parked_version == *parked_version)
                    && *skip
                    && let Some(input) = p.input
                {
                    // Given up: a redelivery is not handled either.
                    self.handled.insert(input.id());
                }
            }
        }
    }

    /// Decides what handling `input` appends. Pure.
    pub(crate) fn decide(
        &self,
        process: &P,
        input: &Input<P::Input>,
        record: InputRecord,
        stop: bool,
    ) -> Result<Decision<P::State>, String> {
        let input_id = record.id();
        if self.handled.contains(&input_id) {
            return Ok(Decision::Duplicate);
        }
        if self.completed {
            if let Input::Rejected(_) = input {
                // A command decided before completion was refused: record
                // it (no `apply`, no `handle`), so the refusal is visible
                // and a replay does not send the command again.
                return Ok(Decision::Append {
                    records: vec![ProcessRecord::Received { input: record }],
                    state: self.state.clone(),
                });
            }
            return Ok(Decision::Ignored("the instance has completed"));
        }
        if let Input::Deadline(d) = input
            && !self.deadline_active(d.id)
        {
            return Ok(Decision::Ignored(
                "the deadline was cancelled, replaced or already fired",
            ));
        }
        let mut state = self.state.clone();
        process.apply(&mut state, input);
        // The deadline being delivered is no longer set.
        let firing = match input {
            Input::Deadline(d) => Some(d.id),
            _ => None,
        };
        let mut out = Outputs::new(
            P::NAME,
            &self.id,
            input_id,
            record.at(),
            self.registered.clone(),
            self.deadlines
                .iter()
                .filter(|(_, (id, _))| Some(*id) != firing)
                .map(|(name, (id, _))| (name.clone(), *id))
                .collect(),
            stop,
        );
        process.handle(&state, input, &mut out);
        let (outputs, errors) = out.finish(stop);
        if let Some(first) = errors.into_iter().next() {
            return Err(first);
        }
        let mut records = Vec::with_capacity(outputs.len() + 1);
        records.push(ProcessRecord::Received { input: record });
        records.extend(outputs);
        Ok(Decision::Append { records, state })
    }

    /// The events of one append: ids derived from (process, instance, input,
    /// index); correlation = the instance's, causation = the input.
    pub(crate) fn event_data(
        &self,
        correlation_id: Uuid,
        records: &[ProcessRecord],
    ) -> Result<Vec<EventData>, EncodeError> {
        let Some(ProcessRecord::Received { input }) = records.first() else {
            return Ok(Vec::new());
        };
        let input_id = input.id();
        let mut metadata = Metadata {
            correlation_id,
            causation_id: input.cause(),
            trace: None,
            extra: Default::default(),
        };
        crate::trace::inject_current(&mut metadata);
        records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                EventData::encode(
                    r,
                    record_id(P::NAME, &self.id, input_id, i),
                    metadata.clone(),
                )
            })
            .collect()
    }

    /// Takes in the records of a successful append.
    pub(crate) fn commit(
        &mut self,
        records: &[ProcessRecord],
        state: P::State,
        correlation_id: Uuid,
        version: u64,
    ) {
        if self.version == 0 {
            self.correlation_id = correlation_id;
        }
        if let Some(trace) = crate::trace::TraceContext::current() {
            self.trace = Some(trace);
        }
        self.state = state;
        let first = (version + 1).saturating_sub(records.len() as u64);
        for (i, r) in records.iter().enumerate() {
            self.version = first + i as u64;
            self.fold_meta(r);
        }
        self.version = version;
    }
}
