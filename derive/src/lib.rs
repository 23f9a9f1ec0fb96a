//! `#[derive(Event)]` for [aftermath](https://docs.rs/aftermath) event enums,
//! and `#[derive(EventUnion)]` for enums that join several of them.
//!
//! Use them through the re-exports, `aftermath::Event` and
//! `aftermath::EventUnion`; see [`macro@Event`] for the attribute syntax and
//! [`macro@EventUnion`] for what a union generates.

#![warn(missing_docs)]

mod attrs;
mod expand;
mod union;

use proc_macro::TokenStream;

/// Derives `aftermath::Event` for an enum whose variants are the events.
///
/// The enum must also derive serde's `Serialize` and `Deserialize` with
/// serde's default (externally tagged) enum representation. Each variant is
/// one event type. The stored payload is the variant's *content* only, as
/// JSON, and the type name is stored beside it, qualified by the enum's
/// prefix (`#[event(prefix = "account")]`):
///
/// | variant                      | stored type name    | stored payload       |
/// |------------------------------|---------------------|----------------------|
/// | `Deposited { amount: u64 }`  | `account.Deposited` | `{"amount":5}`       |
/// | `Deposited(Deposited)`       | `account.Deposited` | the inner value's JSON, e.g. `{"amount":5}` |
/// | `Closed`                     | `account.Closed`    | `null`               |
/// | `Moved(u32, u32)`            | `account.Moved`     | `[1,2]` (a JSON array of the fields) |
///
/// # Why a prefix, and why it is required
///
/// Subscribers ask the store for the type names their enum declares. Bare
/// variant names collide across enums (`AccountEvent::Opened` and
/// `OrderEvent::Opened`), and a reader of one would receive and decode the
/// other's events. With a prefix per enum the names cannot collide unless
/// two enums are given the same prefix, and two members of one
/// `#[derive(EventUnion)]` that decode the same name are a compile error.
/// The prefix is written out rather than derived from the enum's name
/// because it is stored with every event: renaming the Rust type must not
/// change it. The aggregate's `CATEGORY` is a good choice. Stores written
/// with bare names keep loading through
/// `Upcasters::new().unqualified::<AccountEvent>()`.
///
/// # Attributes
///
/// On the enum, `#[event(prefix = "...")]` (required): the first part of
/// every stored name, dot-separated words such as `"account"` or
/// `"bank.account"`.
///
/// On a variant, `#[event(...)]` takes these keys (several may share one
/// attribute, and the attribute may be repeated); both are relative to the
/// prefix:
///
/// - `name = "..."`: the stored type name after the prefix. Defaults to the
///   variant's name. Once events are stored, keep the name stable: rename
///   the variant freely but pin its old name here.
/// - `alias = "..."`: another name that still decodes to this variant, for
///   events stored under an old name. Repeatable:
///   `#[event(alias = "A", alias = "B")]`.
///
/// ```ignore
/// use aftermath::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Deposited {
///     amount: u64,
/// }
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(prefix = "account")]
/// enum AccountEvent {
///     // type name "account.Opened", payload {"owner":".."}
///     Opened { owner: String },
///     // type name "account.Deposited", payload {"amount":5}: the struct's JSON
///     Deposited(Deposited),
///     // type name "account.Withdrawn"; also decodes events stored as
///     // "account.MoneyWithdrawn" or "account.Debited"
///     #[event(name = "Withdrawn", alias = "MoneyWithdrawn", alias = "Debited")]
///     Withdrew { amount: u64 },
///     // type name "account.Closed", payload null
///     Closed,
/// }
///
/// assert_eq!(
///     AccountEvent::event_types(),
///     [
///         "account.Opened", "account.Deposited", "account.Withdrawn", "account.Closed",
///         "account.MoneyWithdrawn", "account.Debited",
///     ]
/// );
/// assert_eq!(AccountEvent::PREFIX, Some("account"));
/// ```
///
/// `event_types()` (the constant `EVENT_TYPES`) lists every current name,
/// in variant order, then every alias.
///
/// # Serde
///
/// The variant is identified by its position, not by its serde name, so
/// `#[serde(rename)]` and `#[serde(rename_all)]` on variants are harmless, and
/// field attributes (`rename`, `default`, `with`, `skip_serializing_if`, ...)
/// apply as usual because the enum's own serde impls do the work.
/// Rejected at compile time: `#[serde(tag)]`, `#[serde(content)]` and
/// `#[serde(untagged)]` on the enum, and `#[serde(skip..)]` or
/// `#[serde(untagged)]` on a variant. Other ways of not being an externally
/// tagged enum (`#[serde(into/from)]` to a differently shaped type,
/// hand-written impls) fail at run time with an `EncodeError` or
/// `PayloadError` saying so.
///
/// # Generics
///
/// Type and const parameters are supported: the impl requires the enum to
/// be `Serialize + DeserializeOwned + Send + Sync + 'static` (naming the
/// `serde` crate, or the path given by `#[serde(crate = "..")]`). Lifetime
/// parameters are rejected: decoded events own their data.
///
/// # Errors
///
/// The derive refuses, with a message saying what to do: structs and
/// unions, enums without variants, an enum without `#[event(prefix)]` (the
/// message suggests one), a prefix with spaces or empty segments, two
/// variants sharing a type name (by name or alias), unknown `#[event]`
/// keys, values that are not non-empty string literals, `prefix` on a
/// variant, `name`/`alias` on the enum, and `#[event]` on fields.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    expand::derive(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Derives `aftermath::Event` for an enum that joins the events of several
/// aggregates, such as the inputs of a process manager.
///
/// Each variant is a one-field tuple variant wrapping a type that implements
/// `aftermath::Event` (an enum with `#[derive(Event)]`, or another union).
/// Nothing is stored for the union itself: an event keeps the type name and
/// payload its member gives it.
///
/// ```ignore
/// use aftermath::{Event, EventUnion};
///
/// #[derive(Debug, Clone, PartialEq, EventUnion)]
/// enum FulfillmentInput {
///     Order(OrderEvent),
///     Payment(PaymentEvent),
///     Inventory(InventoryEvent),
/// }
///
/// // `From` for each member: the union takes any of its members' events.
/// let input = FulfillmentInput::from(OrderEvent::Placed { items: 2 });
/// assert_eq!(input.event_type(), "order.Placed");
/// ```
///
/// The generated impl:
///
/// - `event_type` and `encode` delegate to the wrapped event, so its stored
///   type name and payload are exactly the member's.
/// - `EVENT_TYPES` (and `event_types()`) is every member's list joined, in
///   variant order, computed at compile time.
/// - Two members that decode the same type name are a compile error naming
///   the name and both members (an evaluation of a constant fails): a
///   reader of the union could not tell whose event it is. Members with
///   different prefixes never collide.
/// - `decode` asks each member in variant order and returns the first
///   answer that is not `Ok(None)`; a member that knows the type name but
///   cannot read the payload returns its `PayloadError` unchanged. A name no
///   member knows decodes to `Ok(None)`.
///
/// It also implements `From<Member>` for the union, for every member type.
///
/// # Errors
///
/// The derive refuses, with a message saying what to do: structs and
/// unions, enums without variants, variants that are not a tuple variant
/// with exactly one field (unit variants, named fields, several fields),
/// generic parameters (type, const and lifetime), and a member type that appears in two variants (the second could
/// never be decoded, and `From` could not choose; types are compared as
/// written, so the same type spelled differently is caught by the compiler
/// instead, as conflicting `From` impls). A member type that does not
/// implement `Event` is reported at that type.
#[proc_macro_derive(EventUnion)]
pub fn derive_event_union(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    union::derive(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
