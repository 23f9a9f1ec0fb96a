//! `#[derive(Event)]` (being written).
use proc_macro::TokenStream;
/// Derives `aftermath::Event`.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(_input: TokenStream) -> TokenStream { TokenStream::new() }
