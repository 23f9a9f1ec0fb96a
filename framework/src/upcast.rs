//! Schema evolution beyond renames: upcasters turn a payload stored in an old
//! shape (and possibly under an old type name) into the current one.
//!
//! A store is opened with its [`Upcasters`]; every read path of that store
//! (stream reads for aggregate loads, `$all` reads for subscriptions) applies
//! them before handing an event out, so readers only ever see current shapes.
//! Upcasting happens on read only: stored rows are never rewritten.
//!
//! ```
//! use aftermath::upcast::Upcasters;
//! use serde_json::json;
//!
//! // v1 stored `{"cents": 250}` under "Deposited"; v2 stores `{"amount": 250, "currency": "EUR"}`.
//! let upcasters = Upcasters::new().register("Deposited", |mut v| {
//!     if let Some(cents) = v.get("cents").cloned() {
//!         v = json!({ "amount": cents, "currency": "EUR" });
//!     }
//!     Ok(v)
//! });
//! assert!(upcasters.handles("Deposited"));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::event::{DecodeError, Event, StoredEvent};

type UpcastFn = dyn Fn(Value) -> Result<Value, String> + Send + Sync;

struct Upcaster {
    to: String,
    f: Arc<UpcastFn>,
}

/// A registry of upcasters, keyed by the stored type name.
///
/// Each upcaster maps old JSON to current JSON for one type name and may
/// give the result a new type name ([`Upcasters::register_renamed`]). Chains
/// are followed: an upcaster's output type may have upcasters of its own.
/// An upcaster must leave a payload that is already current unchanged, since
/// it runs on every event stored under its type name. Renames that keep the
/// payload ([`Upcasters::rename`], [`Upcasters::unqualified`]) do not parse
/// it at all.
#[derive(Clone, Default)]
pub struct Upcasters {
    by_type: HashMap<String, Arc<Vec<Upcaster>>>,
    /// Stored name -> the name it is read as, payload unchanged.
    renames: HashMap<String, String>,
}

/// The longest chain of upcasters followed for one event (guards cycles).
const MAX_CHAIN: usize = 32;

impl Upcasters {
    /// An empty registry: events are read as stored.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `f` for payloads stored under `event_type`; the type name
    /// stays the same.
    pub fn register(
        self,
        event_type: &str,
        f: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.register_renamed(event_type, event_type, f)
    }

    /// Registers `f` for payloads stored under `from`, whose result is read as
    /// type `to`.
    pub fn register_renamed(
        mut self,
        from: &str,
        to: &str,
        f: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        let entry = self.by_type.entry(from.to_owned()).or_default();
        let mut list: Vec<Upcaster> = entry
            .iter()
            .map(|u| Upcaster {
                to: u.to.clone(),
                f: u.f.clone(),
            })
            .collect();
        list.push(Upcaster {
            to: to.to_owned(),
            f: Arc::new(f),
        });
        *entry = Arc::new(list);
        self
    }

    /// Reads events stored under `from` as type `to`, payload unchanged
    /// (a rename without the JSON round trip of
    /// [`Upcasters::register_renamed`]). Renaming one name to two targets
    /// keeps the first: a stored name is read as exactly one type.
    pub fn rename(mut self, from: &str, to: &str) -> Self {
        if from != to {
            self.renames
                .entry(from.to_owned())
                .or_insert_with(|| to.to_owned());
        }
        self
    }

    /// Keeps reading events that `E` stored before type names were
    /// qualified: every current name and alias of `E` stored without its
    /// `#[event(prefix)]` (`"Opened"` for `"account.Opened"`) is read under its
    /// qualified name. This is the migration path for a store written before
    /// aftermath 0.2, when `#[derive(Event)]` stored bare variant names.
    ///
    /// The old names are global, so register each old name for one enum
    /// only: when two enums stored the same bare name (the collision the
    /// prefix exists to prevent), the first registration decides how those
    /// old events are read. Types without a prefix (unions, hand-written
    /// impls) have nothing to rename; register their members instead.
    ///
    /// ```
    /// use aftermath::{Event, Upcasters};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
    /// #[event(prefix = "account")]
    /// enum AccountEvent {
    ///     Opened { owner: String },
    ///     #[event(alias = "Credited")]
    ///     Deposited { amount: u64 },
    /// }
    ///
    /// let upcasters = Upcasters::new().unqualified::<AccountEvent>();
    /// // Old stores hold "Opened", "Deposited" and "Credited".
    /// assert!(upcasters.handles("Opened") && upcasters.handles("Credited"));
    /// assert_eq!(
    ///     upcasters.stored_types(&["account.Deposited"]),
    ///     ["account.Deposited", "Deposited"]
    /// );
    /// ```
    pub fn unqualified<E: Event>(mut self) -> Self {
        let Some(prefix) = E::PREFIX else {
            return self;
        };
        let dotted = format!("{prefix}.");
        for name in E::EVENT_TYPES {
            if let Some(bare) = name.strip_prefix(&dotted) {
                self = self.rename(bare, name);
            }
        }
        self
    }

    /// True when no upcaster is registered.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty() && self.renames.is_empty()
    }

    /// True when an upcaster or rename is registered for `event_type`.
    pub fn handles(&self, event_type: &str) -> bool {
        self.by_type.contains_key(event_type) || self.renames.contains_key(event_type)
    }

    /// Applies the upcasters registered for the event's type, in order of
    /// registration, following renames. An upcaster that fails gives a
    /// [`DecodeError`] naming the event.
    pub fn apply(&self, event: &mut StoredEvent) -> Result<(), DecodeError> {
        if !self.handles(&event.event_type) {
            return Ok(());
        }
        let error = |event: &StoredEvent, message: String| DecodeError {
            stream: event.stream.clone(),
            version: event.version,
            position: event.position,
            event_type: event.event_type.clone(),
            message,
        };
        // Parsed on first use: renames alone leave the payload untouched.
        let mut value: Option<Value> = None;
        let mut current = event.event_type.clone();
        let mut steps = 0;
        loop {
            let mut renamed = None;
            if let Some(list) = self.by_type.get(&current).cloned() {
                let mut json = match value.take() {
                    Some(json) => json,
                    None => serde_json::from_slice(&event.payload)
                        .map_err(|e| error(event, format!("payload is not JSON: {e}")))?,
                };
                for upcaster in list.iter() {
                    json = (upcaster.f)(json).map_err(|e| {
                        error(event, format!("upcaster for `{current}` failed: {e}"))
                    })?;
                    if upcaster.to != current {
                        renamed = Some(upcaster.to.clone());
                        break;
                    }
                }
                value = Some(json);
            }
            if renamed.is_none() {
                renamed = self.renames.get(&current).cloned();
            }
            steps += 1;
            match renamed {
                Some(next) if steps < MAX_CHAIN => current = next,
                Some(_) => {
                    return Err(error(
                        event,
                        format!("upcaster chain longer than {MAX_CHAIN} steps (a cycle?)"),
                    ));
                }
                None => break,
            }
        }
        if let Some(value) = value {
            event.payload = serde_json::to_vec(&value)
                .map_err(|e| error(event, format!("upcasted payload does not encode: {e}")))?;
        }
        event.event_type = current;
        Ok(())
    }

    /// The stored type names a reader must ask the store for to receive
    /// `wanted` after upcasting: `wanted` itself plus every old name an
    /// upcaster renames into one of them (transitively).
    pub fn stored_types(&self, wanted: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = wanted.iter().map(|s| (*s).to_owned()).collect();
        let mut i = 0;
        while i < out.len() {
            let target = out[i].clone();
            for (from, list) in &self.by_type {
                if list.iter().any(|u| u.to == target) && !out.contains(from) {
                    out.push(from.clone());
                }
            }
            for (from, to) in &self.renames {
                if *to == target && !out.contains(from) {
                    out.push(from.clone());
                }
            }
            i += 1;
        }
        out
    }
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<&String> = self.by_type.keys().chain(self.renames.keys()).collect();
        types.sort();
        f.debug_struct("Upcasters").field("types", &types).finish()
    }
}
