//! The guide's runnable chapters (`docs/`): each shows a failure happening
//! without the pattern first, then the aftermath way not failing, and checks
//! both. It exits non-zero when a property it demonstrates does not hold.
//!
//! ```text
//! cargo run -p aftermath-examples --bin guide              # every chapter
//! cargo run -p aftermath-examples --bin guide -- outbox    # one of: two-phase outbox inbox at-least-once saga
//! ```
//!
//! Everything runs in memory: the "card processor", the "broker" and the
//! "mailbox" are small fakes that behave like their real counterparts in the
//! one way that matters here (they remember idempotency keys or message ids,
//! or they do not).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aftermath::prelude::*;
use aftermath::process::testkit::ProcessTest;
use aftermath::process::{Input, Outputs, ProcessManager, Route};
use aftermath::reactor::testkit::{Faults, FaultyJournal, ReactorTest, Scenario, Step};
use aftermath::reactor::{EffectContext, MemoryJournal, ReactError, Reactor, ReactorRunner};
use aftermath::subscription::MemoryCheckpoints;
use aftermath_examples::bank::{Account, AccountCommand, Balances};
use aftermath_examples::fulfillment::{
    Fulfillment, FulfillmentInput, FulfillmentState, InventoryEvent, Order, OrderCommand,
    OrderEvent, Payment, PaymentCommand, PaymentEvent, Shipping, ShippingCommand, ShippingEvent,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

type Error = Box<dyn std::error::Error>;

/// The chapters with a demonstration, in the guide's order.
const CHAPTERS: [&str; 6] = [
    "two-phase",
    "outbox",
    "inbox",
    "at-least-once",
    "saga",
    "operating",
];

#[tokio::main]
async fn main() -> Result<(), Error> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".to_owned());
    let selected: Vec<&str> = match which.as_str() {
        "all" => CHAPTERS.to_vec(),
        one if CHAPTERS.contains(&one) => vec![one],
        other => {
            return Err(format!(
                "unknown chapter `{other}`; one of: {} all",
                CHAPTERS.join(" ")
            )
            .into());
        }
    };
    for name in selected {
        println!("== {name}");
        match name {
            "two-phase" => two_phase().await?,
            "outbox" => outbox().await?,
            "inbox" => inbox().await?,
            "at-least-once" => at_least_once().await?,
            "saga" => saga().await?,
            _ => operating().await?,
        }
        println!();
    }
    println!("every property shown holds");
    Ok(())
}

/// Prints what holds, or fails the run.
fn check(holds: bool, what: &str) -> Result<(), Error> {
    if holds {
        println!("  holds: {what}");
        Ok(())
    } else {
        Err(format!("DOES NOT HOLD: {what}").into())
    }
}

// ---------------------------------------------------------------------------
// Chapter 1: why two-phase commit fails, and what replaces it.

// ANCHOR: card_processor
/// A card processor: an HTTP API outside our database. A charge cannot be
/// rolled back (only refunded, by another call). Like real processors, it
/// drops a request whose idempotency key it has seen before.
#[derive(Clone, Default)]
struct CardProcessor {
    charges: Arc<Mutex<Vec<(String, u64)>>>,
    requests: Arc<Mutex<usize>>,
    keys: Arc<Mutex<HashSet<String>>>,
}

impl CardProcessor {
    fn charge(&self, card: &str, amount: u64, idempotency_key: Option<&str>) {
        *self.requests.lock().unwrap() += 1;
        if let Some(key) = idempotency_key
            && !self.keys.lock().unwrap().insert(key.to_owned())
        {
            return; // seen this key: the first request's charge stands
        }
        self.charges.lock().unwrap().push((card.to_owned(), amount));
    }
}
// ANCHOR_END: card_processor

impl CardProcessor {
    fn charges(&self) -> usize {
        self.charges.lock().unwrap().len()
    }

    fn requests(&self) -> usize {
        *self.requests.lock().unwrap()
    }
}

// ANCHOR: naive_checkout
/// The usual request handler: charge the card and store the order "in one
/// transaction". The database can roll its part back; the card processor
/// cannot.
fn naive_checkout(
    orders: &Mutex<Vec<String>>,
    processor: &CardProcessor,
    order: &str,
    crash_before_commit: bool,
) -> Result<(), Error> {
    // BEGIN
    processor.charge("visa-4242", 4200, None); // the outside world has changed
    if crash_before_commit {
        // The process dies (deploy, OOM kill, lost connection): the database
        // rolls back, the order is gone. The charge is not.
        return Err("crashed before COMMIT".into());
    }
    orders.lock().unwrap().push(order.to_owned()); // COMMIT
    Ok(())
}
// ANCHOR_END: naive_checkout

// ANCHOR: checkout_aggregate
/// The decision: an order placed, with what to charge. Nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(prefix = "checkout")]
enum CheckoutEvent {
    Placed { card: String, amount: u64 },
}

#[derive(Debug, Clone)]
enum CheckoutCommand {
    Place { card: String, amount: u64 },
}

#[derive(Debug, thiserror::Error)]
enum CheckoutError {
    #[error("the order was placed before")]
    AlreadyPlaced,
}

#[derive(Debug, Default)]
struct Checkout {
    placed: bool,
}

impl Aggregate for Checkout {
    const CATEGORY: &'static str = "checkout";
    type Command = CheckoutCommand;
    type Event = CheckoutEvent;
    type Error = CheckoutError;

    fn decide(&self, command: CheckoutCommand) -> Result<Vec<CheckoutEvent>, CheckoutError> {
        let CheckoutCommand::Place { card, amount } = command;
        if self.placed {
            return Err(CheckoutError::AlreadyPlaced);
        }
        Ok(vec![CheckoutEvent::Placed { card, amount }])
    }

    fn apply(&mut self, event: &CheckoutEvent) {
        match event {
            CheckoutEvent::Placed { .. } => self.placed = true,
        }
    }
}
// ANCHOR_END: checkout_aggregate

// ANCHOR: charge_reactor
/// The side effect, afterwards, from the log: charge the card of each
/// placed order, with a key that is the same on every attempt.
struct ChargeCard {
    processor: CardProcessor,
}

#[async_trait]
impl Reactor for ChargeCard {
    type Event = CheckoutEvent;

    fn name(&self) -> &str {
        "charge-card"
    }

    async fn react(
        &self,
        event: &Recorded<CheckoutEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let CheckoutEvent::Placed { card, amount } = &event.event;
        self.processor
            .charge(card, *amount, Some(&ctx.idempotency_key));
        Ok(())
    }
}
// ANCHOR_END: charge_reactor

async fn two_phase() -> Result<(), Error> {
    // ANCHOR: two_phase_naive_run
    let processor = CardProcessor::default();
    let orders = Mutex::new(Vec::new());
    // The first attempt crashes before COMMIT; the client retries.
    let first = naive_checkout(&orders, &processor, "order-1", true);
    let retry = naive_checkout(&orders, &processor, "order-1", false);
    // ANCHOR_END: two_phase_naive_run
    println!("  without the pattern: first attempt {first:?}, retry {retry:?}");
    println!(
        "  orders stored: {}, cards charged: {}",
        orders.lock().unwrap().len(),
        processor.charges()
    );
    check(
        orders.lock().unwrap().len() == 1 && processor.charges() == 2,
        "without the pattern, one order was charged twice",
    )?;

    // ANCHOR: two_phase_aftermath_run
    let processor = CardProcessor::default();
    let store = MemoryStore::new();
    let checkouts = Repository::<Checkout, _>::new(store.clone());

    // 1. Decide, and store the decision. The client's command id makes a
    //    retry after a timeout harmless: it is recognised, not decided again.
    let command_id = Uuid::now_v7();
    let place = || CheckoutCommand::Place {
        card: "visa-4242".into(),
        amount: 4200,
    };
    checkouts
        .execute_with("order-1", place(), CommandMeta::with_id(command_id))
        .await?;
    let retried = checkouts
        .execute_with("order-1", place(), CommandMeta::with_id(command_id))
        .await?;
    assert!(retried.duplicate);

    // 2. The effect, from the log. This run crashes after the processor
    //    charged the card and before the journal recorded it (the worst
    //    moment); the restarted runner charges again, with the same key.
    let crash_after_call = Faults::new().fail(Step::AfterCall, 1);
    let runner = ReactorRunner::new(
        ChargeCard {
            processor: processor.clone(),
        },
        store.clone(),
        FaultyJournal::new(MemoryJournal::new(), crash_after_call),
        MemoryCheckpoints::new(),
    );
    let crashed = runner.catch_up().await;
    assert!(crashed.is_err(), "the injected crash stops the first run");
    runner.catch_up().await?; // the restart
    // ANCHOR_END: two_phase_aftermath_run
    println!(
        "  the aftermath way: {} charge request(s), {} card charge(s)",
        processor.requests(),
        processor.charges()
    );
    check(
        processor.requests() == 2 && processor.charges() == 1,
        "with the pattern, the crash made the runner call twice and the card was charged once",
    )
}

// ---------------------------------------------------------------------------
// Chapter 3: the outbox.

// ANCHOR: broker
/// A message broker. Like NATS JetStream with a `Nats-Msg-Id` header, it
/// drops a message whose id it has stored before (within its duplicate
/// window).
#[derive(Clone, Default)]
struct Broker {
    messages: Arc<Mutex<Vec<(Uuid, String)>>>,
    publishes: Arc<Mutex<usize>>,
}

impl Broker {
    fn publish(&self, message_id: Uuid, body: String) {
        *self.publishes.lock().unwrap() += 1;
        let mut messages = self.messages.lock().unwrap();
        if !messages.iter().any(|(id, _)| *id == message_id) {
            messages.push((message_id, body));
        }
    }
}
// ANCHOR_END: broker

impl Broker {
    fn stored(&self) -> usize {
        self.messages.lock().unwrap().len()
    }

    fn publishes(&self) -> usize {
        *self.publishes.lock().unwrap()
    }
}

// ANCHOR: save_then_publish
/// Save, then publish: two writes to two systems, one after the other.
async fn save_then_publish(
    checkouts: &Repository<Checkout, MemoryStore>,
    broker: &Broker,
    order: &str,
    crash_after_save: bool,
) -> Result<(), Error> {
    let place = CheckoutCommand::Place {
        card: "visa-4242".into(),
        amount: 4200,
    };
    checkouts.execute(order, place).await?; // committed
    if crash_after_save {
        return Err("crashed between the save and the publish".into());
    }
    broker.publish(Uuid::now_v7(), format!("{order} placed"));
    Ok(())
}
// ANCHOR_END: save_then_publish

// ANCHOR: publisher_reactor
/// The outbox: the stored event *is* the message to send. A reactor
/// publishes it from the log, with the event's id as the message id.
struct PublishPlaced {
    broker: Broker,
}

#[async_trait]
impl Reactor for PublishPlaced {
    type Event = CheckoutEvent;

    fn name(&self) -> &str {
        "publish-placed"
    }

    async fn react(
        &self,
        event: &Recorded<CheckoutEvent>,
        _ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let body = serde_json::to_string(&event.event).map_err(ReactError::fatal)?;
        self.broker.publish(event.id, body);
        Ok(())
    }
}
// ANCHOR_END: publisher_reactor

async fn outbox() -> Result<(), Error> {
    let broker = Broker::default();
    let checkouts = Repository::<Checkout, _>::new(MemoryStore::new());
    let crashed = save_then_publish(&checkouts, &broker, "order-1", true).await;
    let retried = save_then_publish(&checkouts, &broker, "order-1", false).await;
    println!("  without the pattern: first attempt {crashed:?}, retry {retried:?}");
    check(
        checkouts.load("order-1").await?.state.placed && broker.stored() == 0,
        "without the pattern, the order is stored and its message is lost for good",
    )?;

    // ANCHOR: outbox_run
    let broker = Broker::default();
    let store = MemoryStore::new();
    let checkouts = Repository::<Checkout, _>::new(store.clone());
    let place = CheckoutCommand::Place {
        card: "visa-4242".into(),
        amount: 4200,
    };
    checkouts.execute("order-1", place).await?; // one write: the event

    // Crash after the publish, before the journal recorded it.
    let runner = ReactorRunner::new(
        PublishPlaced {
            broker: broker.clone(),
        },
        store.clone(),
        FaultyJournal::new(MemoryJournal::new(), Faults::new().fail(Step::AfterCall, 1)),
        MemoryCheckpoints::new(),
    );
    assert!(runner.catch_up().await.is_err());
    runner.catch_up().await?; // restarted: publishes again, same message id
    // ANCHOR_END: outbox_run
    println!(
        "  the aftermath way: {} publish(es), {} message(s) stored by the broker",
        broker.publishes(),
        broker.stored()
    );
    check(
        broker.publishes() == 2 && broker.stored() == 1,
        "with the outbox, the message was published at least once and stored once",
    )
}

// ---------------------------------------------------------------------------
// Chapter 4: the inbox.

// ANCHOR: incoming_message
/// A message from another service: "pay 100 into account ann", with the
/// sender's message id. The broker delivers it at least once.
struct PaymentReceived {
    message_id: String,
    account: String,
    amount: u64,
}
// ANCHOR_END: incoming_message

// ANCHOR: naive_handler
/// Handles a message as if it came exactly once.
async fn naive_handle(
    accounts: &Repository<Account, MemoryStore>,
    message: &PaymentReceived,
) -> Result<(), Error> {
    let deposit = AccountCommand::Deposit {
        amount: message.amount,
    };
    accounts.execute(&message.account, deposit).await?;
    Ok(())
}
// ANCHOR_END: naive_handler

// ANCHOR: inbox_handler
/// Namespace of the command ids this service derives from message ids.
const INBOX: Uuid = Uuid::from_u128(0x6775_6964_652d_696e_626f_7800_0000_0001);

/// The inbox: the command id is derived from the message id, so a
/// redelivered message is the same command, recognised by the aggregate's
/// stream and not decided again.
async fn inbox_handle(
    accounts: &Repository<Account, MemoryStore>,
    message: &PaymentReceived,
) -> Result<bool, Error> {
    let command_id = Uuid::new_v5(&INBOX, message.message_id.as_bytes());
    let deposit = AccountCommand::Deposit {
        amount: message.amount,
    };
    let done = accounts
        .execute_with(&message.account, deposit, CommandMeta::with_id(command_id))
        .await?;
    Ok(done.duplicate)
}
// ANCHOR_END: inbox_handler

async fn inbox() -> Result<(), Error> {
    let message = PaymentReceived {
        message_id: "payments-7f3a".into(),
        account: "ann".into(),
        amount: 100,
    };
    let open = || AccountCommand::Open {
        owner: "Ann".into(),
    };

    let accounts = Repository::<Account, _>::new(MemoryStore::new());
    accounts.execute("ann", open()).await?;
    naive_handle(&accounts, &message).await?;
    naive_handle(&accounts, &message).await?; // redelivered
    let balance = accounts.load("ann").await?.state.balance;
    println!("  without the pattern: balance {balance} after one payment of 100");
    check(
        balance == 200,
        "without the pattern, a redelivered message paid twice",
    )?;

    let accounts = Repository::<Account, _>::new(MemoryStore::new());
    accounts.execute("ann", open()).await?;
    let first = inbox_handle(&accounts, &message).await?;
    let second = inbox_handle(&accounts, &message).await?; // redelivered
    let balance = accounts.load("ann").await?.state.balance;
    println!("  the aftermath way: duplicate? first {first}, second {second}; balance {balance}");
    check(
        !first && second && balance == 100,
        "with the inbox, the redelivered message was recognised and paid once",
    )
}

// ---------------------------------------------------------------------------
// Chapter 5: at-least-once delivery.

// ANCHOR: mailbox
/// A mail provider. `dedupe: false` is a provider (or a hand-written
/// client) that ignores idempotency keys: every request sends a mail.
#[derive(Clone)]
struct Mailbox {
    dedupe: bool,
    sent: Arc<Mutex<Vec<String>>>,
}

impl Mailbox {
    fn send(&self, to: &str, idempotency_key: &str) {
        let mut sent = self.sent.lock().unwrap();
        if self.dedupe && sent.iter().any(|k| k == idempotency_key) {
            return;
        }
        sent.push(idempotency_key.to_owned());
        let _ = to; // a real provider mails `to` here
    }
}

struct WelcomeMail {
    mailbox: Mailbox,
}

#[async_trait]
impl Reactor for WelcomeMail {
    type Event = CheckoutEvent;

    fn name(&self) -> &str {
        "welcome-mail"
    }

    async fn react(
        &self,
        event: &Recorded<CheckoutEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        self.mailbox.send(&event.stream, &ctx.idempotency_key);
        Ok(())
    }
}
// ANCHOR_END: mailbox

fn placed(amount: u64) -> CheckoutEvent {
    CheckoutEvent::Placed {
        card: "visa-4242".into(),
        amount,
    }
}

async fn at_least_once() -> Result<(), Error> {
    // ANCHOR: crash_after_call
    let mailbox = Mailbox {
        dedupe: false,
        sent: Arc::default(),
    };
    let test = ReactorTest::new(WelcomeMail {
        mailbox: mailbox.clone(),
    })
    .event("checkout-1", placed(4200));
    // The runner dies after the mail went out, before the journal knew.
    let crash = test
        .scenario(Scenario::Crash {
            step: Step::AfterCall,
            nth: 1,
        })
        .await?;
    let calls = crash.calls_for(0);
    // ANCHOR_END: crash_after_call
    let keys: HashSet<_> = calls.iter().map(|c| c.idempotency_key.as_str()).collect();
    println!(
        "  a crash after the call: {} call(s) with {} key(s), {} mail(s) sent by a provider that ignores keys",
        calls.len(),
        keys.len(),
        mailbox.sent.lock().unwrap().len()
    );
    check(
        calls.len() == 2 && keys.len() == 1 && mailbox.sent.lock().unwrap().len() == 2,
        "without the pattern (a receiver that ignores the key), one event sent two mails",
    )?;

    // ANCHOR: every_crash_point
    let mailbox = Mailbox {
        dedupe: true,
        sent: Arc::default(),
    };
    let report = ReactorTest::new(WelcomeMail {
        mailbox: mailbox.clone(),
    })
    .event("checkout-1", placed(4200))
    .event("checkout-2", placed(1500))
    .event("checkout-1", placed(300))
    .run() // redelivery, lost journal, a crash at every write
    .await?;
    report.assert_each_effect_keyed_once();
    report.assert_all_done();
    // Each key reached the provider once or more; it sent one mail per key.
    assert_eq!(mailbox.sent.lock().unwrap().len(), report.distinct_keys());
    // ANCHOR_END: every_crash_point
    println!(
        "  the aftermath way: {} scenarios, {} calls, {} repeated keys dropped by the provider, {} mails for {} effects",
        report.scenarios.len(),
        report.calls(),
        report.repeated_calls(),
        mailbox.sent.lock().unwrap().len(),
        report.distinct_keys()
    );
    check(
        report.repeated_calls() > 0 && mailbox.sent.lock().unwrap().len() == report.distinct_keys(),
        "with the key honoured, every crash point still sent one mail per effect",
    )
}

// ---------------------------------------------------------------------------
// Chapter 6: sagas.

// ANCHOR: compensate_at_once
/// The fulfillment saga, except that a missed shipping deadline
/// compensates at once instead of calling the carrier off first.
struct CompensateAtOnce;

impl ProcessManager for CompensateAtOnce {
    const NAME: &'static str = "compensate-at-once";
    type Input = FulfillmentInput;
    type State = FulfillmentState;

    fn route(&self, event: &Recorded<FulfillmentInput>) -> Route {
        Fulfillment.route(event)
    }

    fn apply(&self, state: &mut FulfillmentState, input: &Input<FulfillmentInput>) {
        Fulfillment.apply(state, input)
    }

    fn handle(&self, s: &FulfillmentState, input: &Input<FulfillmentInput>, out: &mut Outputs) {
        match input {
            Input::Deadline(d) if d.name == "shipping" && !s.shipped => {
                out.compensate(); // refund, release the stock
                let reason = "not shipped in time".to_owned();
                out.send::<Order>(s.order.clone(), OrderCommand::Cancel { reason });
                out.complete();
            }
            _ => Fulfillment.handle(s, input, out),
        }
    }
}
// ANCHOR_END: compensate_at_once

/// The inputs of one order up to the shipping request, as recorded.
fn paid_order() -> Vec<FulfillmentInput> {
    vec![
        FulfillmentInput::Order(OrderEvent::Placed {
            order: "o-1".into(),
            customer: "ann".into(),
            sku: "book-42".into(),
            quantity: 1,
            amount: 2500,
            card: "visa-4242".into(),
            address: "221B Baker Street".into(),
        }),
        FulfillmentInput::Inventory(InventoryEvent::Reserved {
            sku: "book-42".into(),
            order: "o-1".into(),
            quantity: 1,
        }),
        FulfillmentInput::Payment(PaymentEvent::Charged {
            order: "o-1".into(),
            amount: 2500,
        }),
    ]
}

fn shipped() -> FulfillmentInput {
    FulfillmentInput::Shipping(ShippingEvent::Shipped {
        order: "o-1".into(),
    })
}

async fn saga() -> Result<(), Error> {
    // ANCHOR: race_naive
    let mut naive = ProcessTest::new(CompensateAtOnce);
    naive.given(paid_order());
    // 48 hours pass. The carrier picked the parcel up at 47:59, but its
    // confirmation is still on its way.
    let timed_out = naive.advance(chrono::Duration::hours(48));
    let late_confirmation = naive.when(shipped());
    // ANCHOR_END: race_naive
    let refunded = timed_out
        .sent::<Payment>()
        .contains(&("o-1".into(), PaymentCommand::Refund));
    println!(
        "  without the pattern: on the deadline {} compensation(s), refunded: {refunded}; the carrier's confirmation: {:?}",
        timed_out.compensations().len(),
        late_confirmation.ignored
    );
    check(
        refunded && timed_out.completed() && !late_confirmation.ignored.is_empty(),
        "without the pattern, the parcel shipped and the money was refunded",
    )?;

    // ANCHOR: race_cancel_first
    let mut saga = ProcessTest::new(Fulfillment);
    saga.given(paid_order());
    let timed_out = saga.advance(chrono::Duration::hours(48));
    // Cancel first: nothing is undone yet.
    timed_out.assert_sent::<Shipping>("o-1", ShippingCommand::Cancel);
    assert!(timed_out.compensations().is_empty());
    // The carrier had already shipped: Shipping refuses the cancellation,
    // and the saga waits for the `Shipped` event that must follow.
    let refused = saga.when_rejected::<Shipping>("o-1", "already shipped");
    assert!(refused.is_empty());
    let confirmed = saga.when(shipped());
    confirmed.assert_sent::<Order>("o-1", OrderCommand::Confirm);
    assert!(confirmed.compensations().is_empty() && confirmed.completed());
    // ANCHOR_END: race_cancel_first
    println!(
        "  the aftermath way: cancel sent first, refusal waited out, order confirmed, {} compensation(s)",
        confirmed.compensations().len()
    );

    // ANCHOR: cancel_accepted
    let mut saga = ProcessTest::new(Fulfillment);
    saga.given(paid_order());
    saga.advance(chrono::Duration::hours(48));
    // The carrier accepted the cancellation: now compensate, newest first.
    let cancelled = saga.when(FulfillmentInput::Shipping(ShippingEvent::Cancelled {
        order: "o-1".into(),
    }));
    let undo: Vec<_> = cancelled
        .compensations()
        .iter()
        .map(|c| c.target.as_str())
        .collect();
    assert_eq!(undo, ["payment", "inventory"]);
    assert!(cancelled.completed());
    // ANCHOR_END: cancel_accepted
    println!("  cancellation accepted: compensated {undo:?}, order cancelled");
    check(
        confirmed.compensations().is_empty() && cancelled.completed() && undo.len() == 2,
        "with cancel-first, the money is refunded only for a parcel that will not ship",
    )
}

// ---------------------------------------------------------------------------
// Chapter 8: operating it.

async fn operating() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("bank.db")).await?;

    // ANCHOR: snapshot_on_demand
    // A long stream, written before snapshots were switched on.
    let accounts = Repository::<Account, _>::new(store.clone());
    let open = AccountCommand::Open {
        owner: "Ann".into(),
    };
    accounts.execute("ann", open).await?;
    for _ in 0..250 {
        let deposit = AccountCommand::Deposit { amount: 10 };
        accounts.execute("ann", deposit).await?;
    }
    // Snapshots on: written when a command crosses a multiple of 1,000, so
    // not for a while. Take one now instead.
    let accounts = accounts.with_snapshots(1_000);
    let taken = accounts.snapshot("ann").await?;
    let loaded = accounts.load("ann").await?;
    assert_eq!(taken, Some(251));
    assert_eq!(
        (loaded.snapshot_version, loaded.events_read),
        (Some(251), 0)
    );
    // ANCHOR_END: snapshot_on_demand
    println!(
        "  snapshot on demand at version {taken:?}: the next load read {} event(s)",
        loaded.events_read
    );

    // ANCHOR: settled
    let worker = Worker::on(store.clone()).projection(Balances).start()?;
    let deposit = AccountCommand::Deposit { amount: 5 };
    let done = accounts.execute("ann", deposit).await?;
    let position = done.position.expect("a deposit appends an event");
    // Wait until the read model includes this command's event.
    worker
        .settled("balances", position, Duration::from_secs(10))
        .await?;
    let balance: i64 = store
        .read(|conn| {
            conn.query_row(
                "SELECT balance FROM balances WHERE account = 'ann'",
                [],
                |row| row.get(0),
            )
            .map_err(|e| aftermath::StoreError::database("reading balances", e))
        })
        .await?;
    assert_eq!(balance, 2_505);
    // Or: everything up to the head as of now.
    worker
        .settled_at_head("balances", &store, Duration::from_secs(10))
        .await?;
    worker.shutdown().await;
    // ANCHOR_END: settled
    println!("  the projection settled at position {position}: balance {balance}");
    check(
        balance == 2_505 && loaded.events_read == 0,
        "a snapshot taken on demand is used, and a read after `settled` sees the command",
    )?;
    scale_out().await
}

/// How many of `worker`'s partitions of `balances` are running (not on
/// standby).
fn running_partitions(worker: &RunningWorker) -> usize {
    worker
        .status()
        .iter()
        .filter(|s| s.name.starts_with("balances#"))
        .filter(|s| matches!(s.state, SubscriberState::Live | SubscriberState::CatchingUp))
        .count()
}

/// Waits (up to 30 s) until `workers` run `expected` partitions each.
async fn until_shared(workers: &[&RunningWorker], expected: &[usize]) -> Result<(), Error> {
    for _ in 0..600 {
        let now: Vec<usize> = workers.iter().map(|w| running_partitions(w)).collect();
        if now == expected {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("the partitions were not shared as {expected:?}").into())
}

async fn scale_out() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("bank.db")).await?;
    let accounts = Repository::<Account, _>::new(store.clone());
    for i in 0..40 {
        let open = AccountCommand::Open {
            owner: format!("owner {i}"),
        };
        accounts.execute(&format!("acct-{i}"), open).await?;
    }
    // ANCHOR: scale_out
    // The same worker on two machines (here: twice in one process): the
    // projection is split into 8 partitions by stream, and the workers
    // running it share them, each under its own lease.
    let start = || {
        Worker::on(store.clone())
            .leased(Duration::from_secs(3))
            .partitioned_projection(Balances, 8, ProjectionOptions::default())
            .start()
    };
    let first = start()?;
    let second = start()?;
    // Within a heartbeat (ttl / 3) each runs half.
    until_shared(&[&first, &second], &[4, 4]).await?;
    // One leaves gracefully: its partitions commit their batch and are
    // released, and the other takes them over without waiting for a TTL.
    second.shutdown().await;
    until_shared(&[&first], &[8]).await?;
    // ANCHOR_END: scale_out
    println!("  two workers ran 4 partitions each; after one left, the other ran all 8");
    let deposit = AccountCommand::Deposit { amount: 7 };
    let done = accounts.execute("acct-3", deposit).await?;
    let key = Partition::new(Partition::of("account-acct-3", 8), 8).key("balances");
    first
        .settled(
            &key,
            done.position.expect("appended"),
            Duration::from_secs(10),
        )
        .await?;
    first.shutdown().await;
    let rows: i64 = store
        .read(|conn| {
            conn.query_row("SELECT count(*) FROM balances", [], |row| row.get(0))
                .map_err(|e| aftermath::StoreError::database("reading balances", e))
        })
        .await?;
    check(
        rows == 40,
        "workers share a partitioned projection and hand partitions over when one leaves",
    )
}
