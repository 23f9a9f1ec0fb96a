//! What `handle` decides: commands, compensations, deadlines, completion.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::input::CommandSpec;
use super::record::{ProcessRecord, record_id};
use crate::aggregate::Aggregate;

/// The outputs of one `handle` call, in the order they were decided.
///
/// Nothing here runs anything: the runner records these in the instance's
/// stream (one append with the input) and dispatches them afterwards.
#[derive(Debug)]
pub struct Outputs {
    process: String,
    instance: String,
    input_id: Uuid,
    now: DateTime<Utc>,
    records: Vec<ProcessRecord>,
    registered: Vec<CommandSpec>,
    deadlines: BTreeMap<String, Uuid>,
    completed: bool,
    errors: Vec<String>,
}

impl Outputs {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        process: &str,
        instance: &str,
        input_id: Uuid,
        now: DateTime<Utc>,
        registered: Vec<CommandSpec>,
        deadlines: BTreeMap<String, Uuid>,
        completing: bool,
    ) -> Self {
        Outputs {
            process: process.to_owned(),
            instance: instance.to_owned(),
            input_id,
            now,
            records: Vec::new(),
            registered,
            deadlines,
            completed: completing,
            errors: Vec::new(),
        }
    }

    /// The input's time: when the runner handled it, by the runner's clock
    /// (a [`ManualClock`](super::ManualClock) in tests), or for a deadline
    /// its due time. Recorded with the input: use it instead of a clock, so
    /// `handle` stays pure and replays decide the same.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// The instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn spec<A: Aggregate>(&mut self, id: String, command: &A::Command) -> Option<CommandSpec>
    where
        A::Command: Serialize,
    {
        match serde_json::to_value(command) {
            Ok(command) => Some(CommandSpec {
                target: A::CATEGORY.to_owned(),
                id,
                command,
            }),
            Err(e) => {
                self.errors.push(format!(
                    "a command to `{}-{id}` does not serialize: {e}",
                    A::CATEGORY
                ));
                None
            }
        }
    }

    /// Sends `command` to aggregate `A` with id `id`. Its command id is
    /// derived from (process, instance, input id, output index).
    ///
    /// ```ignore
    /// out.send::<Inventory>(sku, InventoryCommand::Reserve { order, quantity });
    /// ```
    pub fn send<A: Aggregate>(&mut self, id: impl Into<String>, command: A::Command)
    where
        A::Command: Serialize,
    {
        if let Some(command) = self.spec::<A>(id.into(), &command) {
            self.records.push(ProcessRecord::CommandSent {
                command,
                compensation: false,
            });
        }
    }

    /// Registers the command that undoes a step that succeeded. Nothing is
    /// sent now; [`compensate`](Self::compensate) sends every registered
    /// command, newest first.
    pub fn register_compensation<A: Aggregate>(
        &mut self,
        id: impl Into<String>,
        command: A::Command,
    ) where
        A::Command: Serialize,
    {
        if let Some(command) = self.spec::<A>(id.into(), &command) {
            self.registered.push(command.clone());
            self.records
                .push(ProcessRecord::CompensationRegistered { command });
        }
    }

    /// The registered compensations not sent yet, oldest first.
    pub fn compensations(&self) -> &[CommandSpec] {
        &self.registered
    }

    /// Sends every registered compensation, newest first (the reverse of the
    /// order the steps succeeded in), and clears them. Returns how many.
    pub fn compensate(&mut self) -> usize {
        let steps = std::mem::take(&mut self.registered);
        if steps.is_empty() {
            return 0;
        }
        self.records.push(ProcessRecord::Compensating {
            steps: steps.len() as u32,
        });
        let n = steps.len();
        for command in steps.into_iter().rev() {
            self.records.push(ProcessRecord::CommandSent {
                command,
                compensation: true,
            });
        }
        n
    }

    /// Sets deadline `name` to fire at `due_at` (replacing an earlier
    /// deadline of that name). The instance receives
    /// [`Input::Deadline`](super::Input::Deadline) when it is due, at least
    /// once, unless it was cancelled or the instance completed.
    pub fn set_deadline(&mut self, name: impl Into<String>, due_at: DateTime<Utc>) {
        let name = name.into();
        if let Some(old) = self.deadlines.remove(&name) {
            self.records.push(ProcessRecord::DeadlineCancelled {
                id: old,
                name: name.clone(),
            });
        }
        // The id of the `DeadlineSet` record itself (the `Received` record
        // is index 0), so the deadline's firing points at what set it.
        let id = record_id(
            &self.process,
            &self.instance,
            self.input_id,
            self.records.len() + 1,
        );
        self.deadlines.insert(name.clone(), id);
        self.records
            .push(ProcessRecord::DeadlineSet { id, name, due_at });
    }

    /// Sets deadline `name` to fire `after` the input's time ([`now`](Self::now)).
    pub fn set_deadline_after(&mut self, name: impl Into<String>, after: Duration) {
        let name = name.into();
        match self.now.checked_add_signed(after) {
            Some(due_at) => self.set_deadline(name, due_at),
            None => self.errors.push(format!(
                "deadline `{name}`: {} + {after} is out of range",
                self.now
            )),
        }
    }

    /// Cancels deadline `name`, if set: it will not fire.
    pub fn cancel_deadline(&mut self, name: &str) {
        if let Some(id) = self.deadlines.remove(name) {
            self.records.push(ProcessRecord::DeadlineCancelled {
                id,
                name: name.to_owned(),
            });
        }
    }

    /// Whether deadline `name` is set and has not fired or been cancelled.
    pub fn has_deadline(&self, name: &str) -> bool {
        self.deadlines.contains_key(name)
    }

    /// Completes the instance: after this input it receives nothing more,
    /// its pending deadlines are dropped, and its stream stays as the record.
    /// Commands decided with it are still dispatched.
    pub fn complete(&mut self) {
        self.completed = true;
    }

    /// Whether the instance completes with this input ([`complete`](Self::complete)
    /// was called, or the input was routed with `Route::Stop`).
    pub fn is_complete(&self) -> bool {
        self.completed
    }

    /// The records decided, ending with `Completed` when completing, and
    /// the errors of commands that did not serialize.
    pub(crate) fn finish(mut self, stop: bool) -> (Vec<ProcessRecord>, Vec<String>) {
        if self.completed || stop {
            self.records.push(ProcessRecord::Completed {});
        }
        (self.records, self.errors)
    }
}
