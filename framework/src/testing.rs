//! A given/when/then kit for aggregates: pure, no store, no runtime.
//!
//! `then` also checks that every decided event survives a round trip through
//! its stored form (encode, then decode under its type name), so a serde
//! mistake shows up in the aggregate's unit tests rather than in production.
//!
//! ```
//! use aftermath::prelude::*;
//! use aftermath::testing::AggregateTest;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
//! #[event(prefix = "light")]
//! enum LightEvent { SwitchedOn, SwitchedOff }
//!
//! #[derive(Default)]
//! struct Light { on: bool }
//!
//! #[derive(Debug, PartialEq, thiserror::Error)]
//! #[error("the light is already on")]
//! struct AlreadyOn;
//!
//! impl Aggregate for Light {
//!     const CATEGORY: &'static str = "light";
//!     type Command = ();
//!     type Event = LightEvent;
//!     type Error = AlreadyOn;
//!     fn decide(&self, _: ()) -> Result<Vec<LightEvent>, AlreadyOn> {
//!         if self.on { Err(AlreadyOn) } else { Ok(vec![LightEvent::SwitchedOn]) }
//!     }
//!     fn apply(&mut self, event: &LightEvent) {
//!         self.on = matches!(event, LightEvent::SwitchedOn);
//!     }
//! }
//!
//! AggregateTest::<Light>::given_nothing().when(()).then([LightEvent::SwitchedOn]);
//! AggregateTest::<Light>::given([LightEvent::SwitchedOn]).when(()).then_error(AlreadyOn);
//! let light = AggregateTest::<Light>::given([LightEvent::SwitchedOn, LightEvent::SwitchedOff])
//!     .when(())
//!     .then([LightEvent::SwitchedOn]);
//! assert!(light.on);
//! ```

use std::fmt::Debug;

use crate::aggregate::Aggregate;
use crate::event::Event;

/// The "given" part: an aggregate folded from past events.
pub struct AggregateTest<A: Aggregate> {
    state: A,
}

impl<A: Aggregate> AggregateTest<A> {
    /// An aggregate with no history.
    pub fn given_nothing() -> Self {
        AggregateTest {
            state: A::default(),
        }
    }

    /// An aggregate that has recorded `events`.
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::default();
        for event in events {
            state.apply(&event);
        }
        AggregateTest { state }
    }

    /// The state folded from the given events.
    pub fn state(&self) -> &A {
        &self.state
    }

    /// Decides `command` against the given state.
    pub fn when(self, command: A::Command) -> Outcome<A> {
        let result = self.state.decide(command);
        Outcome {
            state: self.state,
            result,
        }
    }
}

/// The "then" part: what `decide` returned.
pub struct Outcome<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Outcome<A> {
    /// Asserts the command was accepted with exactly `expected` events, that
    /// each survives encode/decode unchanged, and returns the state after
    /// applying them.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) -> A
    where
        A::Event: PartialEq + Debug,
        A::Error: Debug,
    {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        let events = match self.result {
            Ok(events) => events,
            Err(e) => panic!("expected events {expected:?}, but the command was rejected: {e:?}"),
        };
        assert_eq!(
            events, expected,
            "decided events differ from the expected ones"
        );
        let mut state = self.state;
        for event in &events {
            assert_round_trip(event);
            state.apply(event);
        }
        state
    }

    /// Asserts the command was rejected with `expected`.
    #[track_caller]
    pub fn then_error(self, expected: A::Error)
    where
        A::Event: Debug,
        A::Error: PartialEq + Debug,
    {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, but the command decided {events:?}"),
            Err(e) => assert_eq!(e, expected, "the command was rejected with another error"),
        }
    }

    /// Asserts the command was rejected and returns the error, for errors
    /// that are not `PartialEq`.
    #[track_caller]
    pub fn then_rejected(self) -> A::Error
    where
        A::Event: Debug,
    {
        match self.result {
            Ok(events) => panic!("expected a rejection, but the command decided {events:?}"),
            Err(e) => e,
        }
    }

    /// The raw result of `decide`.
    pub fn result(&self) -> &Result<Vec<A::Event>, A::Error> {
        &self.result
    }
}

/// Asserts that `event` encodes and decodes back to itself under its type
/// name.
#[track_caller]
pub fn assert_round_trip<E: Event + PartialEq + Debug>(event: &E) {
    let bytes = event
        .encode()
        .unwrap_or_else(|e| panic!("event {event:?} does not encode: {e}"));
    match E::decode(event.event_type(), &bytes) {
        Ok(Some(back)) => assert_eq!(
            &back, event,
            "event changed in a round trip through storage"
        ),
        Ok(None) => panic!(
            "event {event:?} encodes under type `{}`, which its enum does not decode",
            event.event_type()
        ),
        Err(e) => panic!("event {event:?} does not decode from its own encoding: {e}"),
    }
}
