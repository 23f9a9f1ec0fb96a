//! `#[derive(Event)]` for [aftermath](https://docs.rs/aftermath) event enums.
//!
//! Use it through the re-export, `aftermath::Event`; see [`macro@Event`] for
//! the attribute syntax.

#![warn(missing_docs)]

mod attrs;
mod expand;

use proc_macro::TokenStream;

/// Derives `aftermath::Event` for an enum whose variants are the events.
///
/// The enum must also derive serde's `Serialize` and `Deserialize` with
/// serde's default (externally tagged) enum representation. Each variant is
/// one event type. The stored payload is the variant's *content* only, as
/// JSON, and the type name is stored beside it:
///
/// | variant                      | stored payload       |
/// |------------------------------|----------------------|
/// | `Deposited { amount: u64 }`  | `{"amount":5}`       |
/// | `Deposited(Deposited)`       | the inner value's JSON, e.g. `{"amount":5}` |
/// | `Closed`                     | `null`               |
/// | `Moved(u32, u32)`            | `[1,2]` (a JSON array of the fields) |
///
/// # Attributes
///
/// On a variant, `#[event(...)]` takes these keys (several may share one
/// attribute, and the attribute may be repeated):
///
/// - `name = "..."`: the stored type name. Defaults to the variant's name.
///   Once events are stored, keep the name stable: rename the variant freely
///   but pin its old name here.
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
/// enum AccountEvent {
///     // type name "Opened", payload {"owner":".."}
///     Opened { owner: String },
///     // type name "Deposited", payload {"amount":5}: the struct's JSON
///     Deposited(Deposited),
///     // type name "Withdrawn"; also decodes events stored as
///     // "MoneyWithdrawn" or "Debited"
///     #[event(name = "Withdrawn", alias = "MoneyWithdrawn", alias = "Debited")]
///     Withdrew { amount: u64 },
///     // type name "Closed", payload null
///     Closed,
/// }
///
/// assert_eq!(
///     AccountEvent::event_types(),
///     ["Opened", "Deposited", "Withdrawn", "Closed", "MoneyWithdrawn", "Debited"]
/// );
/// ```
///
/// `event_types()` lists every current name, in variant order, then every
/// alias.
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
/// unions, enums without variants, two variants sharing a type name (by
/// name or alias), unknown `#[event]` keys, values that are not non-empty
/// string literals, and `#[event]` on the enum itself or on fields.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    expand::derive(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
