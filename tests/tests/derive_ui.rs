//! Compile errors of `#[derive(Event)]` and `#[derive(EventUnion)]` (the
//! `event_union_*` files): each file in `tests/ui` must fail to compile with
//! the message in its `.stderr` next to it.
//!
//! After changing a message on purpose, regenerate with
//! `TRYBUILD=overwrite cargo test -p aftermath-tests --test derive_ui` and
//! read the new `.stderr` files before committing them.

#[test]
fn derive_event_compile_errors() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("ui/*.rs");
}
