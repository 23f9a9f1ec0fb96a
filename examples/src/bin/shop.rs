//! A small shop: decisions first, side effects afterwards, in reactors.
//!
//! Run: `cargo run -p aftermath-examples --bin shop`
//!
//! With `-- --keep shop.db` it writes the store to `shop.db` (which must not
//! exist yet), keeps it, and stops once the dead letter is parked: it is
//! left for an operator and the `aftermath` tool (`cargo run -p aftermath-cli
//! -- --sqlite shop.db dead-letters`, see the README).
//!
//! It places three orders (pure decisions, stored as events in a fresh
//! SQLite file), then a worker runs the reactors that touch the outside
//! world, against a local HTTP service standing in for the payment and mail
//! providers: `payments` charges each order (the provider fails twice with
//! 503 first: retried with backoff) and records the payment on the order;
//! `confirmation-mail` mails the customer once the order is paid (the mail
//! provider refuses one address with 400: a dead letter). An operator then
//! fixes the cause and retries the dead letter. Every call carries the
//! effect's idempotency key, so the providers apply each effect once.
//!
//! When NATS answers at `AFTERMATH_NATS_URL` (default
//! `nats://127.0.0.1:4222`, JetStream on), an outbox publishes every order
//! event to the JetStream stream `SHOP_ORDERS` (`shop.orders.<event type>`,
//! `Nats-Msg-Id` = event id); otherwise that part is skipped.

use std::collections::HashSet;
use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

use aftermath::nats::{NatsOutbox, WindowPolicy, headers};
use aftermath::prelude::*;
use aftermath::reactor::{EffectJournal, EffectState, Reactor, ReactorOptions, ReactorRunner};
use aftermath::store::read_all_pages;
use aftermath::worker::Worker;
use aftermath::{StoreError, StoredEvent};
use aftermath_examples::effects_service::{EffectsService, reason};
use aftermath_examples::shop::{
    ChargePayment, ConfirmationMail, Order, OrderCommand, OrderEvent, money,
};
use async_nats::jetstream::{self, stream};
use futures::TryStreamExt;
use uuid::Uuid;

const STREAM: &str = "SHOP_ORDERS";
const OUTBOX: &str = "integration-events";
const REFUSED: &str = "mallory@example.invalid";
/// How long a crashed shop process may take to come back, in the outbox's retry horizon.
const RESTART_ALLOWANCE: Duration = Duration::from_secs(10 * 60);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, file] = args.as_slice()
        && flag == "--keep"
    {
        let path = Path::new(file);
        if path.exists() {
            return Err(format!("{file} exists: give a new file to --keep").into());
        }
        return run(path, true).await;
    }
    if !args.is_empty() {
        return Err("usage: shop [--keep FILE]".into());
    }
    let dir = std::env::temp_dir().join(format!("aftermath-shop-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&dir.join("shop.db"), false).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(db: &Path, keep: bool) -> Result<(), Box<dyn Error>> {
    let store = SqliteStore::open(db).await?;
    let orders = Repository::<Order, _>::new(store.clone());
    let providers = EffectsService::start().await?;
    let addr = providers.addr();
    println!(
        "event store: {} (SQLite, a fresh file for this run)",
        db.display()
    );
    println!(
        "payment and mail providers: a local HTTP service at http://{addr} (/payments, /mail)"
    );
    let url = std::env::var("AFTERMATH_NATS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let nats = match connect_nats(&url).await {
        Ok((js, last)) => {
            println!(
                "NATS: {url} answers; order events go to JetStream stream {STREAM} (shop.orders.<event type>)"
            );
            Some((js, last))
        }
        Err(e) => {
            println!("NATS: not reachable at {url} ({e}); skipping the integration-events outbox");
            None
        }
    };

    println!("\n== orders placed (decisions only: nothing has left the process yet)");
    let script = [
        ("1001", "ann@example.com", &["tea", "cake"][..], 1_250),
        ("1002", "bob@example.com", &["coffee"][..], 380),
        ("1003", REFUSED, &["scarf"][..], 2_900),
    ];
    for (id, email, items, total) in script {
        let command = OrderCommand::Place {
            email: email.to_owned(),
            items: items.iter().map(|i| (*i).to_owned()).collect(),
            total,
        };
        let done = orders.execute(id, command).await?;
        println!(
            "  order-{id} {} for {} by {email} -> version {}",
            items.join(" + "),
            money(total),
            done.version
        );
    }

    println!("\n== faults the providers will inject");
    providers.fail_next(2);
    providers.fail_body(REFUSED);
    println!("  the payment provider answers the next 2 calls with 503 (transient)");
    println!("  the mail provider refuses {REFUSED} with 400 (permanent)");

    let mut reactors = vec!["payments", "confirmation-mail"];
    let options = ReactorOptions::default()
        .retry_delay(Duration::from_millis(50), Duration::from_millis(400))
        .max_attempts(5)
        .poll_interval(Duration::from_millis(25));
    let mut worker = Worker::new()
        .add_subscriber(runner(
            ChargePayment::new(addr, orders.clone()),
            &store,
            &options,
        ))
        .add_subscriber(runner(
            ConfirmationMail::new(addr, orders.clone()),
            &store,
            &options,
        ));
    if let Some((js, _)) = &nats {
        let outbox = NatsOutbox::new(OUTBOX, js.clone(), |e: &Recorded<OrderEvent>| {
            Some(format!("shop.orders.{}", e.event.event_type()))
        })
        .retry_horizon(NatsOutbox::<OrderEvent>::retry_horizon_of(
            &options,
            RESTART_ALLOWANCE,
        ))
        .window_policy(WindowPolicy::Refuse);
        // The stream must remember message ids for as long as the outbox
        // may re-publish one: checked at start, refused if not.
        let check = outbox
            .check_duplicate_window("shop.orders.order.Placed")
            .await?;
        println!(
            "  stream {} drops re-publishes for {:?}, the outbox may re-publish for {:?}: covered",
            check.stream, check.duplicate_window, check.retry_horizon
        );
        worker = worker.add_subscriber(runner(outbox, &store, &options));
        reactors.push(OUTBOX);
    }
    println!("\n== a worker runs the reactors: {}", reactors.join(", "));
    let running = worker.start().expect("unique subscriber names");
    // Three orders placed, three paid: six events, each settled by every reactor.
    wait_for("the reactors to settle every event", || async {
        let events = events(&store).await?;
        if events.len() < 6 {
            return Ok(false);
        }
        for reactor in &reactors {
            let (_, unsettled) = settled(&store, reactor, &events).await?;
            if unsettled > 0 {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;

    println!("\n== dead letters (EffectJournal::parked)");
    let parked = store.parked(None).await?;
    for e in &parked {
        println!(
            "  {} {} {}: {} ({} attempt)",
            e.reactor,
            e.stream,
            e.event_type,
            e.last_error.as_deref().unwrap_or("?"),
            e.attempts
        );
    }

    if keep {
        running.shutdown().await;
        println!(
            "\n== left for an operator in {}: try `cargo run -p aftermath-cli -- --sqlite {} dead-letters`",
            db.display(),
            db.display()
        );
        return Ok(());
    }

    println!("\n== an operator fixes the cause and retries the dead letters");
    providers.heal_body(REFUSED);
    println!("  the mail provider accepts {REFUSED} again");
    for e in &parked {
        let retried = store.retry(&e.reactor, e.event_id).await?;
        println!("  retry({}, {}) -> {retried}", e.reactor, e.stream);
    }
    for e in &parked {
        wait_for("the retried effect", || async {
            let state = store
                .load(&e.reactor, &[e.event_id])
                .await?
                .get(&e.event_id)
                .map(|x| x.state);
            Ok(state == Some(EffectState::Done))
        })
        .await?;
        println!(
            "  {} {} {}: done after the operator's retry",
            e.reactor, e.stream, e.event_type
        );
    }
    assert!(store.parked(None).await?.is_empty(), "no dead letters left");

    println!("\n== what the providers saw (they deduplicate by Idempotency-Key)");
    for call in providers.call_log() {
        println!(
            "  POST /{:<8} {} {:<19} {}",
            call.effect,
            call.status,
            reason(call.status),
            call.body
        );
    }
    let counts = providers.applied_counts();
    let once = counts.values().all(|n| *n == 1);
    let applied = providers.applied_log();
    let payments = applied.iter().filter(|a| a.effect == "payments").count();
    let mails = applied.iter().filter(|a| a.effect == "mail").count();
    println!(
        "  {} calls, {} injected faults, {} repeats refused; applied: {payments} payments, {mails} mails",
        providers.calls(),
        providers.faults(),
        providers.duplicates()
    );
    if once && payments == 3 && mails == 3 {
        println!("  each effect applied exactly once");
    } else {
        return Err(format!("effects not applied exactly once: {counts:?}").into());
    }

    println!("\n== orders");
    for (id, ..) in script {
        let order = orders.load(id).await?;
        println!(
            "  order-{id} version {}: {} {}",
            order.version,
            money(order.state.total),
            if order.state.paid { "paid" } else { "NOT paid" }
        );
    }

    println!("\n== integration events on NATS");
    match &nats {
        Some((js, before)) => {
            let events = events(&store).await?;
            let published = published_since(js, *before, &events).await?;
            for (sequence, subject, headers) in &published {
                println!("  #{sequence} {subject:<18} {headers}");
            }
            println!(
                "  {} messages for {} events: one each, Nats-Msg-Id = event id (a re-publish after a crash is dropped by JetStream)",
                published.len(),
                events.len()
            );
        }
        None => println!("  skipped: NATS is not reachable at {url}"),
    }

    running.shutdown().await;
    Ok(())
}

/// A reactor on the SQLite store: events, effect journal and checkpoint in one file.
fn runner<R: Reactor>(
    reactor: R,
    store: &SqliteStore,
    options: &ReactorOptions,
) -> ReactorRunner<R, SqliteStore, SqliteStore, SqliteStore> {
    ReactorRunner::new(reactor, store.clone(), store.clone(), store.clone())
        .options(options.clone())
}

/// Connects and makes sure the stream exists; returns its last sequence.
async fn connect_nats(url: &str) -> Result<(jetstream::Context, u64), Box<dyn Error>> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(url)
        .await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client);
    let stream = js
        .create_or_update_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec!["shop.orders.>".to_owned()],
            storage: stream::StorageType::File,
            // An example: keep an hour of history, and drop a re-published
            // message id for that long (JetStream's default is 2 minutes,
            // shorter than the outbox may take to publish again).
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(3600),
            ..Default::default()
        })
        .await?;
    Ok((js, stream.state.last_sequence))
}

/// This run's messages in the stream: (sequence, subject, headers).
async fn published_since(
    js: &jetstream::Context,
    before: u64,
    events: &[StoredEvent],
) -> Result<Vec<(u64, String, String)>, Box<dyn Error>> {
    let ids: HashSet<String> = events.iter().map(|e| e.id.to_string()).collect();
    let stream = js.get_stream(STREAM).await?;
    let last = stream.get_info().await?.state.last_sequence;
    let mut found = Vec::new();
    for sequence in before + 1..=last {
        let Ok(m) = stream.get_raw_message(sequence).await else {
            continue;
        };
        let header = |name| m.headers.get(name).map(|v| v.as_str().to_owned());
        let Some(id) = header(headers::MSG_ID).filter(|id| ids.contains(id)) else {
            continue;
        };
        found.push((
            sequence,
            m.subject.to_string(),
            format!(
                "Nats-Msg-Id …{} {} {}",
                &id[id.len() - 12..],
                header(headers::SOURCE).unwrap_or_default(),
                header(headers::TYPE).unwrap_or_default(),
            ),
        ));
    }
    Ok(found)
}

async fn events(store: &SqliteStore) -> Result<Vec<StoredEvent>, StoreError> {
    read_all_pages(store, Position::ORIGIN, None, 256)
        .try_collect()
        .await
}

/// (settled, unsettled) effects of `reactor` for `events`.
async fn settled(
    store: &SqliteStore,
    reactor: &str,
    events: &[StoredEvent],
) -> Result<(usize, usize), StoreError> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let entries = store.load(reactor, &ids).await?;
    let settled = entries.values().filter(|e| e.state.is_settled()).count();
    Ok((settled, events.len() - settled))
}

async fn wait_for<F, Fut>(what: &str, mut done: F) -> Result<(), Box<dyn Error>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, StoreError>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done().await? {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
