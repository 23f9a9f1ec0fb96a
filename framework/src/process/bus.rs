//! The aggregates a process may command, by category.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use super::input::CommandSpec;
use crate::aggregate::{Aggregate, CommandMeta, ExecuteError, Repository};
use crate::store::{EventStore, StoreError};

/// How a dispatched command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dispatched {
    /// Its events are stored (`duplicate`: by an earlier dispatch of the
    /// same command id).
    Accepted {
        /// Whether it had been executed before.
        duplicate: bool,
    },
    /// The aggregate refused it, with its error as text.
    Rejected(String),
}

/// Why a command could not be dispatched.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// No aggregate of that category is registered.
    #[error("no aggregate of category `{target}` is registered with the command bus")]
    UnknownTarget {
        /// The category.
        target: String,
    },
    /// The recorded command does not decode as the aggregate's command type.
    #[error("command to `{target}-{id}` does not decode: {message}")]
    BadCommand {
        /// The category.
        target: String,
        /// The aggregate id.
        id: String,
        /// What serde said.
        message: String,
    },
    /// The aggregate's events could not be serialized.
    #[error("command to `{target}-{id}`: {message}")]
    Encode {
        /// The category.
        target: String,
        /// The aggregate id.
        id: String,
        /// What went wrong.
        message: String,
    },
    /// The target's stream cannot take the command: it holds an event that
    /// does not decode, or the command's derived event ids are stored in
    /// another stream. Permanent.
    #[error("command to `{target}-{id}`: {message}")]
    Target {
        /// The category.
        target: String,
        /// The aggregate id.
        id: String,
        /// What the store said.
        message: String,
    },
    /// The store failed or the stream kept changing: transient, retried.
    #[error("command to `{target}-{id}`: {source}")]
    Store {
        /// The category.
        target: String,
        /// The aggregate id.
        id: String,
        /// The store error.
        #[source]
        source: StoreError,
    },
}

impl DispatchError {
    /// Whether retrying can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, DispatchError::Store { .. })
    }
}

#[async_trait]
trait Target: Send + Sync {
    async fn execute(
        &self,
        id: &str,
        command: &serde_json::Value,
        meta: CommandMeta,
    ) -> Result<Dispatched, DispatchError>;
}

struct RepositoryTarget<A: Aggregate, S>(Repository<A, S>);

#[async_trait]
impl<A, S> Target for RepositoryTarget<A, S>
where
    A: Aggregate,
    A::Command: DeserializeOwned + Clone + Sync,
    S: EventStore + Clone,
{
    async fn execute(
        &self,
        id: &str,
        command: &serde_json::Value,
        meta: CommandMeta,
    ) -> Result<Dispatched, DispatchError> {
        let typed: A::Command =
            serde_json::from_value(command.clone()).map_err(|e| DispatchError::BadCommand {
                target: A::CATEGORY.to_owned(),
                id: id.to_owned(),
                message: e.to_string(),
            })?;
        let store = |source| DispatchError::Store {
            target: A::CATEGORY.to_owned(),
            id: id.to_owned(),
            source,
        };
        match self.0.execute_with(id, typed, meta).await {
            Ok(done) => Ok(Dispatched::Accepted {
                duplicate: done.duplicate,
            }),
            Err(ExecuteError::Rejected(reason)) => Ok(Dispatched::Rejected(reason.to_string())),
            // The target's stream holds what cannot be read, or the derived
            // ids clash with another stream: retrying cannot help.
            Err(ExecuteError::Store(
                e @ (StoreError::Decode(_)
                | StoreError::Corrupt { .. }
                | StoreError::DuplicateEventId { .. }
                | StoreError::InvalidStream { .. }),
            )) => Err(DispatchError::Target {
                target: A::CATEGORY.to_owned(),
                id: id.to_owned(),
                message: e.to_string(),
            }),
            Err(ExecuteError::Store(e)) => Err(store(e)),
            Err(e @ ExecuteError::Conflict { .. }) => Err(store(StoreError::database(
                "executing a process command",
                std::io::Error::other(e.to_string()),
            ))),
            Err(ExecuteError::Encode(e)) => Err(DispatchError::Encode {
                target: A::CATEGORY.to_owned(),
                id: id.to_owned(),
                message: e.to_string(),
            }),
        }
    }
}

/// The aggregates registered with the application: process managers send
/// their commands through it, by category.
///
/// ```
/// # use aftermath::prelude::*;
/// # use aftermath::process::CommandBus;
/// # #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Event)]
/// # #[event(prefix = "ev")]
/// # enum Ev { Done {} }
/// # #[derive(Default)] struct Thing;
/// # #[derive(Debug, thiserror::Error)] #[error("no")] struct No;
/// # impl Aggregate for Thing {
/// #     const CATEGORY: &'static str = "thing";
/// #     type Command = u32; type Event = Ev; type Error = No;
/// #     fn decide(&self, _: u32) -> Result<Vec<Ev>, No> { Ok(vec![Ev::Done {}]) }
/// #     fn apply(&mut self, _: &Ev) {}
/// # }
/// let store = MemoryStore::new();
/// let bus = CommandBus::new().register(Repository::<Thing, _>::new(store.clone()));
/// assert!(bus.knows("thing"));
/// ```
#[derive(Clone, Default)]
pub struct CommandBus {
    targets: HashMap<&'static str, Arc<dyn Target>>,
}

impl CommandBus {
    /// A bus without aggregates.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers aggregate `A` (commands decode from JSON, so its command
    /// type is `Deserialize`; processes that send it need `Serialize`).
    /// Registering a category again replaces the earlier repository.
    pub fn register<A, S>(mut self, repository: Repository<A, S>) -> Self
    where
        A: Aggregate,
        A::Command: DeserializeOwned + Clone + Sync,
        S: EventStore + Clone,
    {
        self.targets
            .insert(A::CATEGORY, Arc::new(RepositoryTarget(repository)));
        self
    }

    /// Whether a category is registered.
    pub fn knows(&self, category: &str) -> bool {
        self.targets.contains_key(category)
    }

    /// Executes a recorded command with the given ids.
    pub async fn dispatch(
        &self,
        command: &CommandSpec,
        meta: CommandMeta,
    ) -> Result<Dispatched, DispatchError> {
        let target = self.targets.get(command.target.as_str()).ok_or_else(|| {
            DispatchError::UnknownTarget {
                target: command.target.clone(),
            }
        })?;
        target.execute(&command.id, &command.command, meta).await
    }
}
