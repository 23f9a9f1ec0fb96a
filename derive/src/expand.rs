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
    if let Err(error) = attrs::reject_event_attrs(&input.attrs, "the enum itself") {
        errors.push(error);
    }
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

    Ok(generate(input, &variants))
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

fn generate(input: &DeriveInput, variants: &[Variant<'_>]) -> TokenStream {
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

            #[inline]
            fn event_types() -> &'static [&'static str] {
                &[#(#all_types),*]
            }

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
