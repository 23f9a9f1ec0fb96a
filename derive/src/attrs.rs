//! Parsing of `#[event(...)]` and the checks on `#[serde(...)]` attributes.

use proc_macro2::{Span, TokenStream};
use syn::spanned::Spanned;
use syn::{Attribute, Expr, ExprLit, Lit, LitStr, Token};

/// A type name given in an attribute, with where it was written.
pub struct Name {
    pub value: String,
    pub span: Span,
}

/// What `#[event(...)]` attributes say about one variant.
#[derive(Default)]
pub struct VariantAttrs {
    /// `name = ".."`, at most one.
    pub name: Option<Name>,
    /// Every `alias = ".."`, in order.
    pub aliases: Vec<Name>,
}

const KNOWN_KEYS: &str = "the known keys on a variant are `name` (its type name after the \
     enum's prefix, e.g. #[event(name = \"Opened\")]) and `alias` (an old name that still \
     decodes, e.g. #[event(alias = \"Created\")])";

/// What `#[event(...)]` attributes say about the enum itself.
#[derive(Default)]
pub struct EnumAttrs {
    /// `prefix = ".."`, at most one.
    pub prefix: Option<Name>,
}

/// Reads the `#[event(...)]` attributes of the enum: `prefix = ".."`.
pub fn enum_attrs(attrs: &[Attribute]) -> syn::Result<EnumAttrs> {
    let mut out = EnumAttrs::default();
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("event")) {
        if !matches!(attr.meta, syn::Meta::List(_)) {
            return Err(syn::Error::new_spanned(
                attr,
                "#[event] on the enum needs its prefix, like #[event(prefix = \"account\")]",
            ));
        }
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") || meta.path.is_ident("alias") {
                return Err(meta.error(
                    "`name` and `alias` go on a variant; the enum takes \
                     #[event(prefix = \"..\")], the first part of every stored type name",
                ));
            }
            if !meta.path.is_ident("prefix") {
                let shown = meta
                    .path
                    .get_ident()
                    .map_or_else(|| "this key".to_owned(), |ident| format!("`{ident}`"));
                return Err(meta.error(format!(
                    "unknown #[event] key {shown} on the enum; the enum takes \
                     #[event(prefix = \"account\")], the first part of every stored type name"
                )));
            }
            if !meta.input.peek(Token![=]) {
                return Err(meta
                    .error("`prefix` needs a string value, like #[event(prefix = \"account\")]"));
            }
            let value = string_value("prefix", &meta.value()?.parse::<Expr>()?)?;
            if let Some(first) = &out.prefix {
                let mut error = syn::Error::new(
                    value.span,
                    format!(
                        "the enum already has `prefix = \"{}\"`; an enum has one prefix",
                        first.value
                    ),
                );
                error.combine(syn::Error::new(first.span, "first `prefix` given here"));
                return Err(error);
            }
            check_prefix(&value)?;
            out.prefix = Some(value);
            Ok(())
        })?;
    }
    Ok(out)
}

/// A prefix is dot-separated words: no spaces, no empty segment.
fn check_prefix(prefix: &Name) -> syn::Result<()> {
    let value = &prefix.value;
    if value.chars().any(char::is_whitespace) {
        return Err(syn::Error::new(
            prefix.span,
            format!(
                "`prefix = \"{value}\"` contains whitespace; use e.g. \"account\" or \"bank.account\""
            ),
        ));
    }
    if value.split('.').any(str::is_empty) {
        return Err(syn::Error::new(
            prefix.span,
            format!(
                "`prefix = \"{value}\"` has an empty segment: the stored names are \
                 `<prefix>.<name>`, so write it without leading, trailing or doubled dots, \
                 e.g. \"account\" or \"bank.account\""
            ),
        ));
    }
    Ok(())
}

/// Reads every `#[event(...)]` attribute of a variant.
pub fn variant_attrs(attrs: &[Attribute]) -> syn::Result<VariantAttrs> {
    let mut out = VariantAttrs::default();
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("event")) {
        if !matches!(attr.meta, syn::Meta::List(_)) {
            return Err(syn::Error::new_spanned(
                attr,
                format!(
                    "#[event] needs keys in parentheses, like #[event(name = \"..\")]; {KNOWN_KEYS}"
                ),
            ));
        }
        attr.parse_nested_meta(|meta| {
            let key = if meta.path.is_ident("name") {
                "name"
            } else if meta.path.is_ident("alias") {
                "alias"
            } else if meta.path.is_ident("prefix") {
                return Err(meta.error(
                    "`prefix` goes on the enum, not on a variant: \
                     #[event(prefix = \"account\")] above `enum ..` gives every variant's \
                     stored name that first part",
                ));
            } else {
                let shown = meta
                    .path
                    .get_ident()
                    .map_or_else(|| "this key".to_owned(), |ident| format!("`{ident}`"));
                return Err(meta.error(format!("unknown #[event] key {shown}; {KNOWN_KEYS}")));
            };
            if !meta.input.peek(Token![=]) {
                return Err(meta.error(format!(
                    "`{key}` needs a string value, like #[event({key} = \"AccountOpened\")]"
                )));
            }
            let value = string_value(key, &meta.value()?.parse::<Expr>()?)?;
            if key == "name" {
                if let Some(first) = &out.name {
                    let mut error = syn::Error::new(
                        value.span,
                        format!(
                            "a variant has one type name and this one already has \
                             `name = \"{}\"`; use `alias` for old names that should still decode",
                            first.value
                        ),
                    );
                    error.combine(syn::Error::new(first.span, "first `name` given here"));
                    return Err(error);
                }
                out.name = Some(value);
            } else {
                out.aliases.push(value);
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// The non-empty string literal given to `key`.
fn string_value(key: &str, expr: &Expr) -> syn::Result<Name> {
    let example = if key == "prefix" { "account" } else { "Opened" };
    let lit: &LitStr = match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => lit,
        _ => {
            return Err(syn::Error::new(
                expr.span(),
                format!(
                    "`{key}` takes a string literal, like #[event({key} = \"{example}\")]: \
                     type names are stored, so they are written out"
                ),
            ));
        }
    };
    let value = lit.value();
    if value.trim().is_empty() {
        return Err(syn::Error::new(
            lit.span(),
            format!("`{key}` cannot be empty: give the type name the event is stored under"),
        ));
    }
    Ok(Name {
        value,
        span: lit.span(),
    })
}

/// Rejects `#[event]` where it means nothing (on fields).
pub fn reject_event_attrs(attrs: &[Attribute], place: &str) -> syn::Result<()> {
    match attrs.iter().find(|attr| attr.path().is_ident("event")) {
        Some(attr) => Err(syn::Error::new_spanned(
            attr,
            format!(
                "#[event(...)] goes on the enum (`prefix`) and on its variants (`name`, \
                 `alias`), not on {place}"
            ),
        )),
        None => Ok(()),
    }
}

/// Keys of the `#[serde(...)]` attributes in `attrs`, with their spans.
///
/// Best effort: an attribute this cannot read is skipped, serde reports it.
fn serde_keys(attrs: &[Attribute]) -> Vec<(String, Span)> {
    let mut keys = Vec::new();
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("serde")) {
        let mut found = Vec::new();
        let parsed = attr.parse_nested_meta(|meta| {
            if let Some(ident) = meta.path.get_ident() {
                found.push((ident.to_string(), meta.path.span()));
            }
            // Skip the value, whatever it is.
            if meta.input.peek(Token![=]) {
                meta.value()?.parse::<Expr>()?;
            } else if meta.input.peek(syn::token::Paren) {
                let content;
                syn::parenthesized!(content in meta.input);
                content.parse::<TokenStream>()?;
            }
            Ok(())
        });
        if parsed.is_ok() {
            keys.extend(found);
        }
    }
    keys
}

/// Rejects serde enum representations the codec cannot work with.
pub fn check_serde_enum(attrs: &[Attribute]) -> syn::Result<()> {
    for (key, span) in serde_keys(attrs) {
        let written = match key.as_str() {
            "tag" => "#[serde(tag = \"..\")]",
            "content" => "#[serde(content = \"..\")]",
            "untagged" => "#[serde(untagged)]",
            _ => continue,
        };
        return Err(syn::Error::new(
            span,
            format!(
                "#[derive(Event)] needs serde's default (externally tagged) enum representation: \
                 the type name is stored beside the payload and the payload is the variant's \
                 content alone; remove {written}"
            ),
        ));
    }
    Ok(())
}

/// Rejects serde variant attributes that stop a variant from round-tripping.
pub fn check_serde_variant(attrs: &[Attribute]) -> syn::Result<()> {
    for (key, span) in serde_keys(attrs) {
        if matches!(
            key.as_str(),
            "skip" | "skip_serializing" | "skip_deserializing" | "untagged"
        ) {
            return Err(syn::Error::new(
                span,
                format!(
                    "every variant of a #[derive(Event)] enum is an event type that is written \
                     and read back, so it must serialize and deserialize as a tagged variant; \
                     remove #[serde({key})] or move the variant out of the event enum"
                ),
            ));
        }
    }
    Ok(())
}

/// The path given by `#[serde(crate = "..")]` on the enum, if any.
pub fn serde_crate(attrs: &[Attribute]) -> Option<syn::Path> {
    let mut path = None;
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("serde")) {
        let _ = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("crate") {
                let lit: LitStr = meta.value()?.parse()?;
                path = Some(lit.parse::<syn::Path>()?);
            } else if meta.input.peek(Token![=]) {
                meta.value()?.parse::<Expr>()?;
            } else if meta.input.peek(syn::token::Paren) {
                let content;
                syn::parenthesized!(content in meta.input);
                content.parse::<TokenStream>()?;
            }
            Ok(())
        });
    }
    path
}
