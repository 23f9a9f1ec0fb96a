//! The generated `impl ::aftermath::Event` and `From` impls of
//! `#[derive(EventUnion)]`.

use std::collections::HashMap;

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Ident, Type};

use crate::expand::Errors;

/// One variant: `Ident(Member)`.
struct Member<'a> {
    ident: &'a Ident,
    ty: &'a Type,
}

pub fn derive(input: &DeriveInput) -> syn::Result<TokenStream> {
    let data = match &input.data {
        Data::Enum(data) => data,
        Data::Struct(data) => {
            return Err(syn::Error::new(
                data.struct_token.span,
                "#[derive(EventUnion)] works on enums: each variant wraps one event type, \
                 e.g. `enum Input { Order(OrderEvent), Payment(PaymentEvent) }`",
            ));
        }
        Data::Union(data) => {
            return Err(syn::Error::new(
                data.union_token.span,
                "#[derive(EventUnion)] works on enums, not Rust unions: write an enum with \
                 one variant per event type, e.g. `enum Input { Order(OrderEvent), \
                 Payment(PaymentEvent) }`",
            ));
        }
    };
    let ident = &input.ident;

    let mut errors = Errors::default();
    if !input.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &input.generics.params,
            "#[derive(EventUnion)] does not support generic parameters: the joined \
             `EVENT_TYPES` list and the check that no two members decode the same name are \
             computed at compile time, for concrete types only; remove the parameters and \
             wrap concrete event types \
             (a generic event enum can still be a member at one type, e.g. \
             `Order(OrderEvent<Online>)`)",
        ));
    }
    if data.variants.is_empty() {
        errors.push(syn::Error::new(
            ident.span(),
            format!(
                "#[derive(EventUnion)] needs at least one variant: each variant of `{ident}` \
                 wraps one event type, e.g. `enum {ident} {{ Order(OrderEvent) }}`"
            ),
        ));
    }

    // Member type (as written) -> the variant that already has it.
    let mut seen: HashMap<String, &Ident> = HashMap::new();
    let mut members = Vec::with_capacity(data.variants.len());
    for variant in &data.variants {
        let name = &variant.ident;
        let ty = match &variant.fields {
            Fields::Unnamed(fields) if fields.unnamed.len() == 1 => &fields.unnamed[0].ty,
            Fields::Unnamed(fields) => {
                errors.push(syn::Error::new(
                    fields.paren_token.span.join(),
                    match fields.unnamed.len() {
                        0 => format!(
                            "#[derive(EventUnion)] variants wrap exactly one event type, but \
                             `{name}` has none; write it as `{name}(SomeEvent)`"
                        ),
                        count => format!(
                            "#[derive(EventUnion)] variants wrap exactly one event type, but \
                             `{name}` has {count} fields; write it as `{name}(SomeEvent)`, \
                             with one event type per variant"
                        ),
                    },
                ));
                continue;
            }
            Fields::Named(fields) => {
                errors.push(syn::Error::new(
                    fields.brace_token.span.join(),
                    format!(
                        "#[derive(EventUnion)] variants wrap exactly one event type as a tuple \
                         variant, but `{name}` has named fields; write it as \
                         `{name}(SomeEvent)`"
                    ),
                ));
                continue;
            }
            Fields::Unit => {
                errors.push(syn::Error::new(
                    name.span(),
                    format!(
                        "#[derive(EventUnion)] variants wrap exactly one event type, but \
                         `{name}` has none; write it as `{name}(SomeEvent)`"
                    ),
                ));
                continue;
            }
        };
        let key = quote!(#ty).to_string();
        if let Some(first) = seen.get(&key) {
            errors.push(syn::Error::new(
                ty.span(),
                format!(
                    "variant `{name}` wraps the same event type as variant `{first}`: each \
                     member type may appear in one variant only, since decoding picks the \
                     first variant whose member accepts the event (so `{name}` would never \
                     be decoded) and `From` for that type could not choose between them; \
                     remove one of the two variants"
                ),
            ));
            continue;
        }
        seen.insert(key, name);
        members.push(Member { ident: name, ty });
    }
    errors.finish()?;

    Ok(generate(input, &members))
}

/// A type as written, without the spaces `quote` puts between tokens.
fn quote_type(ty: &Type) -> String {
    let written = quote!(#ty).to_string();
    let mut out = String::with_capacity(written.len());
    for part in written.split(' ') {
        let glue = out
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
            && part.starts_with(|c: char| c.is_alphanumeric() || c == '_');
        if glue {
            out.push(' ');
        }
        out.push_str(part);
    }
    out
}

fn generate(input: &DeriveInput, members: &[Member<'_>]) -> TokenStream {
    let ident = &input.ident;
    // No generic parameters (rejected above), but a bare `where` clause
    // is carried over as written.
    let where_clause = &input.generics.where_clause;

    let idents: Vec<&Ident> = members.iter().map(|member| member.ident).collect();
    // `<Member as Event>` spanned at the member type, so a member that is
    // not an event is reported there.
    let as_event: Vec<TokenStream> = members
        .iter()
        .map(|member| {
            let ty = member.ty;
            quote_spanned!(ty.span()=> <#ty as ::aftermath::Event>)
        })
        .collect();
    let froms = members.iter().map(|Member { ident: variant, ty }| {
        quote! {
            #[automatically_derived]
            impl ::core::convert::From<#ty> for #ident #where_clause {
                #[inline]
                fn from(event: #ty) -> Self {
                    Self::#variant(event)
                }
            }
        }
    });

    // Two members that decode one type name: a compile error naming both.
    let union_name = ident.to_string();
    let member_names = members
        .iter()
        .map(|member| format!("`{}` (`{}`)", member.ident, quote_type(member.ty)));
    let collision_check = quote! {
        const _: () = {
            const CHECK: ([u8; 1024], usize) = ::aftermath::__private::union_collision::<1024>(
                #union_name,
                &[#((#member_names, #as_event::EVENT_TYPES)),*],
            );
            if CHECK.1 > 0 {
                ::core::panic!("{}", ::aftermath::__private::collision_message(&CHECK.0, CHECK.1));
            }
        };
    };

    quote! {
        #collision_check

        #[automatically_derived]
        impl ::aftermath::Event for #ident #where_clause {
            #[inline]
            fn event_type(&self) -> &'static str {
                match self {
                    #(Self::#idents(event) => #as_event::event_type(event),)*
                }
            }

            const EVENT_TYPES: &'static [&'static str] = {
                const LEN: usize = 0 #(+ #as_event::EVENT_TYPES.len())*;
                const ALL: [&'static str; LEN] = ::aftermath::__private::concat_types::<LEN>(
                    &[#(#as_event::EVENT_TYPES),*],
                );
                &ALL
            };

            fn encode(
                &self,
            ) -> ::core::result::Result<::std::vec::Vec<u8>, ::aftermath::EncodeError> {
                match self {
                    #(Self::#idents(event) => #as_event::encode(event),)*
                }
            }

            fn decode(
                event_type: &str,
                payload: &[u8],
            ) -> ::core::result::Result<::core::option::Option<Self>, ::aftermath::PayloadError> {
                #(
                    match #as_event::decode(event_type, payload) {
                        ::core::result::Result::Ok(::core::option::Option::Some(event)) => {
                            return ::core::result::Result::Ok(
                                ::core::option::Option::Some(Self::#idents(event)),
                            );
                        }
                        ::core::result::Result::Ok(::core::option::Option::None) => {}
                        ::core::result::Result::Err(error) => {
                            return ::core::result::Result::Err(error);
                        }
                    }
                )*
                ::core::result::Result::Ok(::core::option::Option::None)
            }
        }

        #(#froms)*
    }
}
