//! Runtime behaviour of `#[derive(Event)]` and its payload codec, and of
//! `#[derive(EventUnion)]`.

use aftermath::{Event, EventUnion, PayloadError};
use serde::{Deserialize, Serialize};

/// A struct shared by several event enums.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "account")]
enum AccountEvent {
    Opened {
        owner: String,
    },
    Deposited(Deposited),
    #[event(name = "Withdrawn", alias = "MoneyWithdrawn")]
    #[event(alias = "Debited", alias = "Taken")]
    Withdrew {
        amount: u64,
    },
    Moved(u32, String),
    Closed,
    #[event(name = "Renamed")]
    NameChanged(String),
}

/// A second enum reusing the same struct (a process manager's inputs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "saga")]
enum SagaInput {
    Started,
    Deposited(Deposited),
}

/// Serde attributes at work: renamed variants, renamed and defaulted fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[serde(rename_all = "snake_case")]
#[event(prefix = "tweaked")]
enum Tweaked {
    #[serde(rename = "something-else-entirely")]
    Opened {
        #[serde(rename = "who")]
        owner: String,
        #[serde(default)]
        note: Option<String>,
        #[serde(default = "default_limit")]
        limit: u32,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        tags: Vec<String>,
    },
    #[serde(alias = "serde_alias_only")]
    BalanceChecked(u64),
    Closed,
}

fn default_limit() -> u32 {
    100
}

/// A generic event enum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "wrapped")]
enum Wrapped<T> {
    Put(T),
    Cleared,
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("payload is UTF-8")
}

fn round_trip<E: Event + std::fmt::Debug + PartialEq>(event: &E) -> E {
    let bytes = event.encode().expect("encodes");
    E::decode(event.event_type(), &bytes)
        .expect("decodes")
        .expect("type is known")
}

#[test]
fn every_variant_shape_round_trips() {
    let events = [
        AccountEvent::Opened {
            owner: "ann".into(),
        },
        AccountEvent::Deposited(Deposited { amount: 5 }),
        AccountEvent::Withdrew { amount: 3 },
        AccountEvent::Moved(7, "x".into()),
        AccountEvent::Closed,
        AccountEvent::NameChanged("bob".into()),
    ];
    for event in &events {
        assert_eq!(&round_trip(event), event);
    }
}

#[test]
fn stores_exactly_the_variant_content() {
    let cases: [(AccountEvent, &str, &str); 6] = [
        (
            AccountEvent::Opened {
                owner: "ann".into(),
            },
            "account.Opened",
            r#"{"owner":"ann"}"#,
        ),
        (
            AccountEvent::Deposited(Deposited { amount: 5 }),
            "account.Deposited",
            r#"{"amount":5}"#,
        ),
        (
            AccountEvent::Withdrew { amount: 5 },
            "account.Withdrawn",
            r#"{"amount":5}"#,
        ),
        (
            AccountEvent::Moved(1, "a".into()),
            "account.Moved",
            r#"[1,"a"]"#,
        ),
        (AccountEvent::Closed, "account.Closed", "null"),
        (
            AccountEvent::NameChanged("bob".into()),
            "account.Renamed",
            r#""bob""#,
        ),
    ];
    for (event, event_type, payload) in cases {
        assert_eq!(event.event_type(), event_type);
        assert_eq!(text(&event.encode().unwrap()), payload, "{event:?}");
        assert_eq!(
            AccountEvent::decode(event_type, payload.as_bytes()).unwrap(),
            Some(event)
        );
    }
}

#[test]
fn event_types_lists_names_then_aliases() {
    assert_eq!(
        AccountEvent::event_types(),
        [
            "account.Opened",
            "account.Deposited",
            "account.Withdrawn",
            "account.Moved",
            "account.Closed",
            "account.Renamed",
            "account.MoneyWithdrawn",
            "account.Debited",
            "account.Taken",
        ]
    );
    assert_eq!(SagaInput::event_types(), ["saga.Started", "saga.Deposited"]);
    assert_eq!(
        Tweaked::event_types(),
        ["tweaked.Opened", "tweaked.BalanceChecked", "tweaked.Closed"]
    );
}

#[test]
fn aliases_decode_to_the_variant() {
    for old in [
        "account.MoneyWithdrawn",
        "account.Debited",
        "account.Taken",
        "account.Withdrawn",
    ] {
        assert_eq!(
            AccountEvent::decode(old, br#"{"amount":9}"#).unwrap(),
            Some(AccountEvent::Withdrew { amount: 9 }),
            "{old}"
        );
    }
}

#[test]
fn unknown_type_is_not_mine() {
    assert_eq!(AccountEvent::decode("account.Frozen", b"{}").unwrap(), None);
    // The Rust variant name is not a type name once `name` overrides it.
    assert_eq!(
        AccountEvent::decode("account.Withdrew", br#"{"amount":1}"#).unwrap(),
        None
    );
    assert_eq!(
        AccountEvent::decode("account.NameChanged", br#""x""#).unwrap(),
        None
    );
    // Names are case sensitive.
    assert_eq!(AccountEvent::decode("account.opened", b"{}").unwrap(), None);
    // Even garbage is fine when the type is not ours: it is not looked at.
    assert_eq!(
        AccountEvent::decode("account.Frozen", b"\xff not json").unwrap(),
        None
    );
}

#[test]
fn payload_that_does_not_fit_names_the_type_and_says_why() {
    let error: PayloadError =
        AccountEvent::decode("account.MoneyWithdrawn", br#"{"amount":"five"}"#).unwrap_err();
    assert_eq!(error.event_type, "account.MoneyWithdrawn");
    assert!(
        error
            .message
            .starts_with("invalid type: string \"five\", expected u64"),
        "{}",
        error.message
    );
    assert!(
        error.to_string().contains("`account.MoneyWithdrawn`"),
        "{error}"
    );

    let error = AccountEvent::decode("account.Opened", b"{}").unwrap_err();
    assert_eq!(error.event_type, "account.Opened");
    assert!(
        error.message.starts_with("missing field `owner`"),
        "{}",
        error.message
    );

    let error = AccountEvent::decode("account.Deposited", b"[").unwrap_err();
    assert!(error.message.contains("EOF"), "{}", error.message);

    let error = AccountEvent::decode("account.Moved", br#"[1]"#).unwrap_err();
    assert!(
        error.message.contains("invalid length 1"),
        "{}",
        error.message
    );

    let error = AccountEvent::decode("account.Closed", b"{}").unwrap_err();
    assert!(error.message.contains("expected unit"), "{}", error.message);

    let error = AccountEvent::decode("account.Closed", b"").unwrap_err();
    assert!(error.message.contains("EOF"), "{}", error.message);
}

#[test]
fn trailing_bytes_are_rejected() {
    for (event_type, payload) in [
        ("account.Deposited", &br#"{"amount":5} {"amount":6}"#[..]),
        ("account.Opened", br#"{"owner":"a"}x"#),
        ("account.Closed", b"null null"),
        ("account.Renamed", br#""a","b""#),
        ("account.Moved", br#"[1,"a"]]"#),
    ] {
        let error = AccountEvent::decode(event_type, payload).unwrap_err();
        assert_eq!(error.event_type, event_type);
        assert!(
            error.message.starts_with("trailing characters"),
            "{event_type}: {}",
            error.message
        );
    }
    // Whitespace around the value is not garbage.
    assert_eq!(
        AccountEvent::decode("account.Deposited", b" {\"amount\": 5}\n").unwrap(),
        Some(AccountEvent::Deposited(Deposited { amount: 5 }))
    );
}

#[test]
fn serde_field_attributes_are_respected() {
    let event = Tweaked::Opened {
        owner: "ann".into(),
        note: None,
        limit: 3,
        tags: vec![],
    };
    assert_eq!(event.event_type(), "tweaked.Opened");
    assert_eq!(
        text(&event.encode().unwrap()),
        r#"{"who":"ann","note":null,"limit":3}"#
    );
    assert_eq!(round_trip(&event), event);

    // `default` fields may be missing; the renamed field must use its serde name.
    assert_eq!(
        Tweaked::decode("tweaked.Opened", br#"{"who":"bob"}"#).unwrap(),
        Some(Tweaked::Opened {
            owner: "bob".into(),
            note: None,
            limit: 100,
            tags: vec![],
        })
    );
    let error = Tweaked::decode("tweaked.Opened", br#"{"owner":"bob"}"#).unwrap_err();
    assert!(
        error.message.starts_with("missing field `who`"),
        "{}",
        error.message
    );
}

#[test]
fn serde_variant_renames_do_not_matter() {
    // The type names come from #[event], never from serde's variant names.
    for event in [
        Tweaked::Opened {
            owner: "a".into(),
            note: Some("n".into()),
            limit: 1,
            tags: vec!["t".into()],
        },
        Tweaked::BalanceChecked(12),
        Tweaked::Closed,
    ] {
        assert_eq!(round_trip(&event), event);
    }
    assert_eq!(
        Tweaked::BalanceChecked(1).event_type(),
        "tweaked.BalanceChecked"
    );
    assert_eq!(
        Tweaked::decode("tweaked.something-else-entirely", b"{}").unwrap(),
        None
    );
    assert_eq!(
        Tweaked::decode("tweaked.serde_alias_only", b"1").unwrap(),
        None
    );
    assert_eq!(
        Tweaked::decode("tweaked.balance_checked", b"1").unwrap(),
        None
    );
    // Proof that serde itself does see the renames.
    assert_eq!(
        serde_json::to_string(&Tweaked::Closed).unwrap(),
        r#""closed""#
    );
}

#[test]
fn shared_struct_decodes_the_same_payload_in_both_enums() {
    let stored = AccountEvent::Deposited(Deposited { amount: 42 });
    let bytes = stored.encode().unwrap();
    assert_eq!(text(&bytes), r#"{"amount":42}"#);
    // The struct's own JSON is exactly the payload.
    assert_eq!(
        bytes,
        serde_json::to_vec(&Deposited { amount: 42 }).unwrap()
    );

    // The other enum reads the same payload under its own name.
    assert_eq!(
        SagaInput::decode("saga.Deposited", &bytes).unwrap(),
        Some(SagaInput::Deposited(Deposited { amount: 42 }))
    );
    assert_eq!(
        SagaInput::decode(stored.event_type(), &bytes).unwrap(),
        None
    );
    assert_eq!(
        SagaInput::Deposited(Deposited { amount: 42 })
            .encode()
            .unwrap(),
        bytes
    );
    // Each enum ignores the other's types.
    assert_eq!(
        SagaInput::decode("account.Opened", br#"{"owner":"a"}"#).unwrap(),
        None
    );
    assert_eq!(AccountEvent::decode("saga.Started", b"null").unwrap(), None);
}

#[test]
fn event_data_encode_uses_the_type_name_and_content() {
    let event = AccountEvent::Withdrew { amount: 2 };
    let data = aftermath::EventData::fresh(&event).unwrap();
    assert_eq!(data.event_type, "account.Withdrawn");
    assert_eq!(text(&data.payload), r#"{"amount":2}"#);
}

#[test]
fn generic_enums_work() {
    let event = Wrapped::Put(Deposited { amount: 1 });
    assert_eq!(event.event_type(), "wrapped.Put");
    assert_eq!(text(&event.encode().unwrap()), r#"{"amount":1}"#);
    assert_eq!(round_trip(&event), event);
    assert_eq!(
        Wrapped::<u8>::decode("wrapped.Put", b"300")
            .unwrap_err()
            .event_type,
        "wrapped.Put"
    );
    assert_eq!(
        Wrapped::<u8>::decode("wrapped.Cleared", b"null").unwrap(),
        Some(Wrapped::Cleared)
    );
    assert_eq!(
        Wrapped::<u8>::event_types(),
        ["wrapped.Put", "wrapped.Cleared"]
    );
}

/// Hand-written serde impls that are not an externally tagged enum fail
/// at run time with a message saying why.
mod not_an_enum {
    use super::*;

    #[derive(Debug, PartialEq, Event)]
    #[event(prefix = "odd")]
    pub enum Odd {
        A(u32),
    }

    impl Serialize for Odd {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let Odd::A(value) = self;
            serializer.serialize_u32(*value)
        }
    }

    impl<'de> Deserialize<'de> for Odd {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            u32::deserialize(deserializer).map(Odd::A)
        }
    }

    #[test]
    fn says_the_representation_is_wrong() {
        let error = Odd::A(1).encode().unwrap_err();
        assert_eq!(error.event_type, "odd.A");
        assert!(
            error.message.contains("externally tagged"),
            "{}",
            error.message
        );
        let error = Odd::decode("odd.A", b"1").unwrap_err();
        assert_eq!(error.event_type, "odd.A");
        assert!(
            error.message.contains("externally tagged"),
            "{}",
            error.message
        );
    }
}

/// `#[derive(EventUnion)]`: one enum over the events of several aggregates.
mod event_union {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
    #[event(prefix = "payment")]
    pub enum PaymentEvent {
        Authorized {
            cents: u64,
        },
        // Also a variant of `AccountEvent`: the prefixes tell them apart.
        Deposited(Deposited),
        #[event(name = "Captured", alias = "Settled")]
        Took {
            cents: u64,
        },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
    #[event(prefix = "inventory")]
    pub enum InventoryEvent {
        Reserved(u32),
        Released,
    }

    #[derive(Debug, Clone, PartialEq, EventUnion)]
    pub enum FulfillmentInput {
        Account(AccountEvent),
        Payment(PaymentEvent),
        Inventory(InventoryEvent),
    }

    /// A union can be a member of another union, and members may be
    /// generic types used at one concrete type.
    #[derive(Debug, Clone, PartialEq, EventUnion)]
    pub enum Nested {
        Fulfillment(FulfillmentInput),
        Wrapped(Wrapped<u8>),
    }

    #[test]
    fn members_round_trip_with_their_own_type_names_and_payloads() {
        let cases: [(FulfillmentInput, &str, &str); 6] = [
            (
                AccountEvent::Opened {
                    owner: "ann".into(),
                }
                .into(),
                "account.Opened",
                r#"{"owner":"ann"}"#,
            ),
            (
                AccountEvent::Withdrew { amount: 5 }.into(),
                "account.Withdrawn",
                r#"{"amount":5}"#,
            ),
            (
                PaymentEvent::Authorized { cents: 7 }.into(),
                "payment.Authorized",
                r#"{"cents":7}"#,
            ),
            (
                PaymentEvent::Took { cents: 3 }.into(),
                "payment.Captured",
                r#"{"cents":3}"#,
            ),
            (
                InventoryEvent::Reserved(2).into(),
                "inventory.Reserved",
                "2",
            ),
            (
                InventoryEvent::Released.into(),
                "inventory.Released",
                "null",
            ),
        ];
        for (input, event_type, payload) in cases {
            assert_eq!(input.event_type(), event_type, "{input:?}");
            let bytes = input.encode().unwrap();
            assert_eq!(text(&bytes), payload, "{input:?}");
            assert_eq!(round_trip(&input), input);
            assert_eq!(
                FulfillmentInput::decode(event_type, payload.as_bytes()).unwrap(),
                Some(input)
            );
        }
        // A member's aliases decode through the union too.
        assert_eq!(
            FulfillmentInput::decode("payment.Settled", br#"{"cents":4}"#).unwrap(),
            Some(FulfillmentInput::Payment(PaymentEvent::Took { cents: 4 }))
        );
        assert_eq!(
            FulfillmentInput::decode("account.Debited", br#"{"amount":4}"#).unwrap(),
            Some(FulfillmentInput::Account(AccountEvent::Withdrew {
                amount: 4
            }))
        );
    }

    #[test]
    fn encode_and_event_data_are_the_members() {
        let member = PaymentEvent::Took { cents: 9 };
        let input = FulfillmentInput::from(member.clone());
        assert_eq!(input.encode().unwrap(), member.encode().unwrap());
        let data = aftermath::EventData::fresh(&input).unwrap();
        assert_eq!(data.event_type, "payment.Captured");
        assert_eq!(text(&data.payload), r#"{"cents":9}"#);
        // What the union wrote, the member reads, and the other way round.
        assert_eq!(
            PaymentEvent::decode(&data.event_type, &data.payload).unwrap(),
            Some(member)
        );
    }

    #[test]
    fn unknown_type_is_not_mine() {
        for unknown in [
            "account.Frozen",
            "Account",
            "Payment",
            "payment.Took",
            "inventory.reserved",
            "",
        ] {
            assert_eq!(
                FulfillmentInput::decode(unknown, b"{}").unwrap(),
                None,
                "{unknown}"
            );
        }
        // The payload of an unknown type is not looked at.
        assert_eq!(
            FulfillmentInput::decode("account.Frozen", b"\xff not json").unwrap(),
            None
        );
    }

    #[test]
    fn payload_that_does_not_fit_returns_the_members_error() {
        for (event_type, payload) in [
            ("account.Opened", &b"{}"[..]),
            ("payment.Captured", br#"{"cents":"five"}"#),
            ("payment.Settled", b"["),
            ("inventory.Reserved", b"-1"),
            ("inventory.Released", b"{}"),
        ] {
            let member_error = match AccountEvent::decode(event_type, payload) {
                Err(error) => error,
                Ok(Some(_)) => unreachable!("{event_type} decodes"),
                Ok(None) => match PaymentEvent::decode(event_type, payload) {
                    Err(error) => error,
                    Ok(Some(_)) => unreachable!("{event_type} decodes"),
                    Ok(None) => InventoryEvent::decode(event_type, payload).unwrap_err(),
                },
            };
            let error: PayloadError = FulfillmentInput::decode(event_type, payload).unwrap_err();
            assert_eq!(error, member_error);
            assert_eq!(error.event_type, event_type);
        }
        let error =
            FulfillmentInput::decode("payment.Captured", br#"{"cents":"five"}"#).unwrap_err();
        assert!(
            error
                .message
                .starts_with("invalid type: string \"five\", expected u64"),
            "{}",
            error.message
        );
    }

    #[test]
    fn a_variant_name_two_members_share_stays_apart_by_prefix() {
        // `Deposited` is a variant of both `AccountEvent` and `PaymentEvent`;
        // their prefixes keep the stored names apart, so each decodes to its
        // own member (a shared stored name would not compile, see
        // ui/event_union_name_collision.rs).
        assert_eq!(
            FulfillmentInput::decode("account.Deposited", br#"{"amount":1}"#).unwrap(),
            Some(FulfillmentInput::Account(AccountEvent::Deposited(
                Deposited { amount: 1 }
            )))
        );
        assert_eq!(
            FulfillmentInput::decode("payment.Deposited", br#"{"amount":2}"#).unwrap(),
            Some(FulfillmentInput::Payment(PaymentEvent::Deposited(
                Deposited { amount: 2 }
            )))
        );
        assert_eq!(FulfillmentInput::decode("Deposited", b"{}").unwrap(), None);
    }

    #[test]
    fn event_types_joins_the_members_in_variant_order() {
        let expected: Vec<&str> = AccountEvent::event_types()
            .iter()
            .chain(PaymentEvent::event_types())
            .chain(InventoryEvent::event_types())
            .copied()
            .collect();
        assert_eq!(FulfillmentInput::event_types(), expected);
        assert_eq!(
            FulfillmentInput::event_types(),
            [
                "account.Opened",
                "account.Deposited",
                "account.Withdrawn",
                "account.Moved",
                "account.Closed",
                "account.Renamed",
                "account.MoneyWithdrawn",
                "account.Debited",
                "account.Taken",
                "payment.Authorized",
                "payment.Deposited",
                "payment.Captured",
                "payment.Settled",
                "inventory.Reserved",
                "inventory.Released",
            ]
        );
        // Each union type has its own list.
        assert_eq!(
            Nested::event_types(),
            [expected.as_slice(), &["wrapped.Put", "wrapped.Cleared"]].concat()
        );
    }

    #[test]
    fn from_wraps_each_member_in_its_variant() {
        assert_eq!(
            FulfillmentInput::from(AccountEvent::Closed),
            FulfillmentInput::Account(AccountEvent::Closed)
        );
        assert_eq!(
            FulfillmentInput::from(PaymentEvent::Authorized { cents: 1 }),
            FulfillmentInput::Payment(PaymentEvent::Authorized { cents: 1 })
        );
        let input: FulfillmentInput = InventoryEvent::Released.into();
        assert_eq!(input, FulfillmentInput::Inventory(InventoryEvent::Released));
        let nested: Nested = input.clone().into();
        assert_eq!(nested, Nested::Fulfillment(input));
        assert_eq!(
            Nested::from(Wrapped::Put(3)),
            Nested::Wrapped(Wrapped::Put(3))
        );
    }

    #[test]
    fn nested_unions_delegate_all_the_way_down() {
        let nested = Nested::from(FulfillmentInput::from(InventoryEvent::Reserved(4)));
        assert_eq!(nested.event_type(), "inventory.Reserved");
        assert_eq!(text(&nested.encode().unwrap()), "4");
        assert_eq!(round_trip(&nested), nested);
        assert_eq!(
            Nested::decode("wrapped.Put", b"7").unwrap(),
            Some(Nested::Wrapped(Wrapped::Put(7)))
        );
        assert_eq!(
            Nested::decode("wrapped.Put", b"300")
                .unwrap_err()
                .event_type,
            "wrapped.Put"
        );
        assert_eq!(Nested::decode("Nope", b"null").unwrap(), None);
    }
}
