//! The generated `impl ::aftermath::Event`.

use std::collections::HashMap;

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::{Data, DeriveInput, GenericParam, Ident, LitStr};

use crate::attrs;

/// One variant, as the generated code sees it.
struct Variant<'a> {
    ident: &'a Ident,
    /// The stored type name.
    name: String,
    /// Old names that still decode.
    aliases: Vec<String>,
}

/// Collects errors so one compile reports all of them.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

pub fn derive(input: &DeriveInput) -> syn::Result<TokenStream> {
    let data = match &input.data {
        Data::Enum(data) => data,
        Data::Struct(data) => {
            return Err(syn::Error::new(
                data.struct_token.span,
                "#[derive(Event)] works on enums: each variant is one event type; \
                 wrap the struct in an enum variant, e.g. `enum MyEvent { Happened(MyStruct) }`",
            ));
        }
        Data::Union(data) => {
            return Err(syn::Error::new(
                data.union_token.span,
                "#[derive(Event)] works on enums: each variant is one event type; \
                 a union cannot be an event, use an enum with one variant per event",
            ));
        }
    };
    let ident = &input.ident;
    if data.variants.is_empty() {
        return Err(syn::Error::new(
            ident.span(),
            format!(
                "#[derive(Event)] needs at least one variant: each variant of `{ident}` is one \
                 event type, e.g. `enum {ident} {{ Happened {{ .. }} }}`"
            ),
        ));
    }

    let mut errors = Errors::default();
    let prefix = match attrs::enum_attrs(&input.attrs) {
        Ok(attrs::EnumAttrs {
            prefix: Some(prefix),
        }) => Some(prefix.value),
        Ok(attrs::EnumAttrs { prefix: None }) => {
            errors.push(missing_prefix(ident, data));
            None
        }
        Err(error) => {
            errors.push(error);
            None
        }
    };
    if let Err(error) = attrs::check_serde_enum(&input.attrs) {
        errors.push(error);
    }
    for param in &input.generics.params {
        if let GenericParam::Lifetime(lifetime) = param {
            errors.push(syn::Error::new_spanned(
                lifetime,
                format!(
                    "#[derive(Event)] enums cannot borrow (`{}`): decoded events own their \
                     data, so use owned types such as String or Vec instead of references",
                    lifetime.lifetime
                ),
            ));
        }
    }

    // Type name -> (variant, how it got the name), to find collisions.
    let mut taken: HashMap<String, (&Ident, &'static str)> = HashMap::new();
    let mut variants = Vec::with_capacity(data.variants.len());
    for variant in &data.variants {
        for field in &variant.fields {
            if let Err(error) = attrs::reject_event_attrs(&field.attrs, "fields") {
                errors.push(error);
            }
        }
        if let Err(error) = attrs::check_serde_variant(&variant.attrs) {
            errors.push(error);
        }
        let parsed = match attrs::variant_attrs(&variant.attrs) {
            Ok(parsed) => parsed,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        let (name, name_span, name_kind) = match parsed.name {
            Some(name) => (name.value, name.span, "its `name`"),
            None => (
                variant.ident.to_string(),
                variant.ident.span(),
                "its variant name",
            ),
        };
        let own = std::iter::once((name.clone(), name_span, name_kind)).chain(
            parsed
                .aliases
                .iter()
                .map(|alias| (alias.value.clone(), alias.span, "an alias")),
        );
        for (value, span, kind) in own {
            if let Some((other, other_kind)) = taken.get(&value) {
                errors.push(collision(
                    &value,
                    span,
                    kind,
                    &variant.ident,
                    other,
                    other_kind,
                ));
            } else {
                taken.insert(value, (&variant.ident, kind));
            }
        }
        variants.push(Variant {
            ident: &variant.ident,
            name,
            aliases: parsed
                .aliases
                .into_iter()
                .map(|alias| alias.value)
                .collect(),
        });
    }
    errors.finish()?;
    let prefix = prefix.unwrap_or_default();
    for variant in &mut variants {
        variant.name = format!("{prefix}.{}", variant.name);
        for alias in &mut variant.aliases {
            *alias = format!("{prefix}.{alias}");
        }
    }

    Ok(generate(input, &prefix, &variants))
}

/// The error for an enum without `#[event(prefix = "..")]`, with a
/// suggestion made from its name (`AccountEvent` -> "account").
fn missing_prefix(ident: &Ident, data: &syn::DataEnum) -> syn::Error {
    let name = ident.to_string();
    let stem = name
        .strip_suffix("Events")
        .or_else(|| name.strip_suffix("Event"))
        .filter(|stem| !stem.is_empty())
        .unwrap_or(&name);
    let mut suggested = String::new();
    for (i, c) in stem.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            suggested.push('_');
        }
        suggested.extend(c.to_lowercase());
    }
    let example = data
        .variants
        .first()
        .map_or_else(|| "Happened".to_owned(), |v| v.ident.to_string());
    syn::Error::new(
        ident.span(),
        format!(
            "#[derive(Event)] needs the prefix of `{name}`'s stored type names: add \
             #[event(prefix = \"{suggested}\")] to the enum, so `{name}::{example}` is stored as \
             \"{suggested}.{example}\". Stored names are qualified so that two enums' variants of \
             the same name never reach each other's readers; the prefix is written out because \
             it is stored with every event and must not change when the Rust type is renamed \
             (the aggregate's category is a good choice)"
        ),
    )
}

fn collision(
    value: &str,
    span: Span,
    kind: &str,
    variant: &Ident,
    other: &Ident,
    other_kind: &str,
) -> syn::Error {
    let message = if variant == other {
        if other_kind == "an alias" {
            format!("alias \"{value}\" is given twice on variant `{variant}`; remove the repeat")
        } else {
            format!(
                "alias \"{value}\" of variant `{variant}` is already its type name \
                 ({other_kind}); remove the alias"
            )
        }
    } else {
        let fix = if kind == "an alias" || other_kind == "an alias" {
            "drop the alias, or rename a variant with #[event(name = \"..\")]"
        } else {
            "give one of them another #[event(name = \"..\")]"
        };
        format!(
            "event type name \"{value}\" is used by two variants: `{other}` ({other_kind}) and \
             `{variant}` ({kind}); a stored type name must decode to exactly one variant, so \
             {fix}"
        )
    };
    syn::Error::new(span, message)
}

fn generate(input: &DeriveInput, prefix: &str, variants: &[Variant<'_>]) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();

    // Generic enums: require what the impl needs, mirroring serde's own
    // bounds through the enum type itself.
    let mut where_clause = where_clause.cloned();
    let has_type_params = input
        .generics
        .params
        .iter()
        .any(|param| !matches!(param, GenericParam::Lifetime(_)));
    if has_type_params {
        let serde = attrs::serde_crate(&input.attrs).unwrap_or_else(|| syn::parse_quote!(::serde));
        where_clause
            .get_or_insert_with(|| syn::parse_quote!(where))
            .predicates
            .push(syn::parse_quote! {
                #ident #ty_generics: #serde::Serialize
                    + #serde::de::DeserializeOwned
                    + ::core::marker::Send
                    + ::core::marker::Sync
                    + 'static
            });
    }

    let idents: Vec<&Ident> = variants.iter().map(|variant| variant.ident).collect();
    let names: Vec<LitStr> = variants
        .iter()
        .map(|variant| LitStr::new(&variant.name, Span::call_site()))
        .collect();
    let all_types = variants
        .iter()
        .map(|variant| &variant.name)
        .chain(variants.iter().flat_map(|variant| &variant.aliases))
        .map(|name| LitStr::new(name, Span::call_site()));
    // Variants are numbered in declaration order, as serde's derived
    // `Deserialize` numbers them (skipped variants are rejected earlier).
    let decode_arms = variants.iter().enumerate().map(|(index, variant)| {
        let index = index as u32;
        let decoded = std::iter::once(&variant.name)
            .chain(&variant.aliases)
            .map(|name| LitStr::new(name, Span::call_site()));
        quote!(#(#decoded)|* => #index,)
    });

    quote! {
        #[automatically_derived]
        impl #impl_generics ::aftermath::Event for #ident #ty_generics #where_clause {
            #[inline]
            #[allow(deprecated)]
            fn event_type(&self) -> &'static str {
                match self {
                    #(Self::#idents { .. } => #names,)*
                }
            }

            const EVENT_TYPES: &'static [&'static str] = &[#(#all_types),*];

            const PREFIX: ::core::option::Option<&'static str> =
                ::core::option::Option::Some(#prefix);

            fn encode(
                &self,
            ) -> ::core::result::Result<::std::vec::Vec<u8>, ::aftermath::EncodeError> {
                ::aftermath::__private::encode_variant(
                    self,
                    ::aftermath::Event::event_type(self),
                )
            }

            fn decode(
                event_type: &str,
                payload: &[u8],
            ) -> ::core::result::Result<::core::option::Option<Self>, ::aftermath::PayloadError> {
                let index: u32 = match event_type {
                    #(#decode_arms)*
                    _ => return ::core::result::Result::Ok(::core::option::Option::None),
                };
                ::core::result::Result::map(
                    ::aftermath::__private::decode_variant::<Self>(index, payload, event_type),
                    ::core::option::Option::Some,
                )
            }
        }
    }
}
