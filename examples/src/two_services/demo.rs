//! The demo of the two services (`orders demo`), also run by the test
//! suite: both services as processes on their own SQLite files, each
//! SIGKILLed mid-flight `kill_rounds` times, then duplicates, a malformed
//! message and an answer about an unknown order injected; then both files
//! are checked.

use std::collections::{BTreeMap, HashSet};
use std::error::Error;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aftermath::nats::{InboxStore, ParkedMessage, headers};
use aftermath::prelude::*;
use async_nats::jetstream;
use uuid::Uuid;

use super::orders::{Order, OrderStatus};
use super::warehouse::Stock;
use super::{ORDERS_INBOX, SKUS, Topology, WAREHOUSE_INBOX, all_events, connect, order_id};

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The `orders` executable (run as `orders serve ...`).
    pub orders_exe: PathBuf,
    /// The `warehouse` executable (run as `warehouse serve ...`).
    pub warehouse_exe: PathBuf,
    /// The NATS server (JetStream on).
    pub url: String,
    /// How many orders.
    pub orders: u32,
    /// How many times each service is SIGKILLed.
    pub kill_rounds: u32,
    /// Print what the services print, prefixed by their name.
    pub echo: bool,
}

/// What the demo found in both services' files.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    /// SIGKILLs, in order, with what was published when each landed.
    pub kills: Vec<String>,
    /// Re-published copies JetStream dropped (same `Nats-Msg-Id`, in the window).
    pub dropped_by_jetstream: usize,
    /// Copies stored without `Nats-Msg-Id` (only the inboxes can absorb them).
    pub copies_stored: usize,
    /// Orders placed (`order.Placed` per order in `orders`' file).
    pub placed: usize,
    /// Orders reserved.
    pub reserved: usize,
    /// Orders out of stock.
    pub out_of_stock: usize,
    /// Problems found (empty when every check held).
    pub problems: Vec<String>,
    /// Parked in `warehouse`'s file.
    pub parked_in_warehouse: Vec<ParkedMessage>,
    /// Parked in `orders`' file.
    pub parked_in_orders: Vec<ParkedMessage>,
    /// Each service's output lines.
    pub output: BTreeMap<String, Vec<String>>,
}

impl DemoReport {
    /// Whether every check held.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Service {
    name: &'static str,
    exe: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    echo: bool,
}

impl Service {
    fn start(&mut self) -> Result<(), Box<dyn Error>> {
        let mut child = Command::new(&self.exe)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.exe.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let (lines, echo) = (self.lines.clone(), self.echo);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if echo {
                    println!("  | {line}");
                }
                lines.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) -> Result<(), Box<dyn Error>> {
        if let Some(mut child) = self.child.take() {
            if let Some(status) = child.try_wait()? {
                return Err(format!("{} exited on its own: {status}", self.name).into());
            }
            child.kill()?; // SIGKILL
            child.wait()?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), Box<dyn Error>> {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            let status = child.wait()?;
            if !status.success() {
                return Err(format!("{} stopped with {status}", self.name).into());
            }
        }
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn messages(js: &jetstream::Context, stream: &str) -> Result<u64, Box<dyn Error>> {
    Ok(js
        .get_stream(stream)
        .await?
        .get_info()
        .await?
        .state
        .messages)
}

/// Waits up to `timeout` for `ready`.
async fn until<F, Fut>(what: &str, timeout: Duration, mut ready: F) -> Result<(), Box<dyn Error>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, Box<dyn Error>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if ready().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn drained(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> Result<bool, Box<dyn Error>> {
    let mut stream = js.get_stream(stream).await?;
    let last = stream.info().await?.state.last_sequence;
    let info = stream.consumer_info(consumer).await?;
    Ok(
        info.num_pending == 0
            && info.num_ack_pending == 0
            && info.ack_floor.stream_sequence == last,
    )
}

/// Runs the demo; the report says what held.
pub async fn run(config: &DemoConfig) -> Result<DemoReport, Box<dyn Error>> {
    let started = Instant::now();
    let topology = Topology::new(format!(
        "two-services.{}",
        &Uuid::new_v4().simple().to_string()[..10]
    ));
    let js = connect(&config.url).await?;
    topology.ensure_streams(&js).await?;
    let dir = tempfile::tempdir()?;
    let orders_db = dir.path().join("orders.db").display().to_string();
    let warehouse_db = dir.path().join("warehouse.db").display().to_string();
    let say = |line: String| {
        if config.echo {
            println!("{line}");
        }
    };
    say(format!(
        "demo: {} orders; orders.db and warehouse.db in {}; streams {} and {}",
        config.orders,
        dir.path().display(),
        topology.orders_stream(),
        topology.warehouse_stream()
    ));
    let mut warehouse = Service {
        name: "warehouse",
        exe: config.warehouse_exe.clone(),
        args: vec![
            "serve".into(),
            warehouse_db.clone(),
            config.url.clone(),
            topology.prefix.clone(),
        ],
        child: None,
        lines: Default::default(),
        echo: config.echo,
    };
    let mut orders = Service {
        name: "orders",
        exe: config.orders_exe.clone(),
        args: vec![
            "serve".into(),
            orders_db.clone(),
            config.url.clone(),
            topology.prefix.clone(),
            config.orders.to_string(),
        ],
        child: None,
        lines: Default::default(),
        echo: config.echo,
    };
    warehouse.start()?;
    orders.start()?;
    let mut report = DemoReport::default();
    let (orders_stream, warehouse_stream) = (topology.orders_stream(), topology.warehouse_stream());
    let wait = Duration::from_secs(30);

    // Kill rounds: each side once per round, while messages are in flight.
    let total = u64::from(config.orders);
    for round in 1..=u64::from(config.kill_rounds) {
        let target = total * round / (u64::from(config.kill_rounds) + 1);
        until("orders to be published", wait, || async {
            Ok(messages(&js, &orders_stream).await? >= target.max(1))
        })
        .await?;
        let published = (
            messages(&js, &orders_stream).await?,
            messages(&js, &warehouse_stream).await?,
        );
        warehouse.kill()?;
        let line = format!(
            "demo: SIGKILL warehouse ({} orders published, {} answers)",
            published.0, published.1
        );
        say(line.clone());
        report.kills.push(line);
        warehouse.start()?;
        until("answers to be published", wait, || async {
            Ok(messages(&js, &warehouse_stream).await? >= (target / 2).max(1))
        })
        .await?;
        let published = (
            messages(&js, &orders_stream).await?,
            messages(&js, &warehouse_stream).await?,
        );
        orders.kill()?;
        let line = format!(
            "demo: SIGKILL orders ({} orders published, {} answers)",
            published.0, published.1
        );
        say(line.clone());
        report.kills.push(line);
        orders.start()?;
    }

    // Duplicates: the first orders and answers again, with their headers.
    until("every order published", wait, || async {
        Ok(messages(&js, &orders_stream).await? >= total)
    })
    .await?;
    until("the first answers", wait, || async {
        Ok(messages(&js, &warehouse_stream).await? >= 3)
    })
    .await?;
    for (stream, count) in [(&orders_stream, 5), (&warehouse_stream, 3)] {
        let handle = js.get_stream(stream.as_str()).await?;
        for sequence in 1..=count {
            let m = handle.get_raw_message(sequence).await?;
            for keep_msg_id in [true, false] {
                let mut copy = async_nats::HeaderMap::new();
                for (name, values) in m.headers.iter() {
                    let name: &str = name.as_ref();
                    if keep_msg_id || name != headers::MSG_ID {
                        for value in values {
                            copy.append(name, value.as_str());
                        }
                    }
                }
                let ack = js
                    .publish_with_headers(m.subject.to_string(), copy, m.payload.clone())
                    .await?
                    .await?;
                if ack.duplicate {
                    report.dropped_by_jetstream += 1;
                } else {
                    report.copies_stored += 1;
                }
            }
        }
    }
    say(format!(
        "demo: re-published 8 messages twice: {} copies dropped by JetStream (same Nats-Msg-Id), \
         {} stored (no Nats-Msg-Id, same ce-id)",
        report.dropped_by_jetstream, report.copies_stored
    ));
    // A malformed message to the warehouse, an answer about an unknown order to orders.
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, "malformed-1");
    js.publish_with_headers(
        topology.placed_subject(),
        h,
        b"\xff\xfe{ not an order".to_vec().into(),
    )
    .await?
    .await?;
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in [
        (headers::MSG_ID, "unknown-order-1"),
        (headers::SPEC_VERSION, "1.0"),
        (headers::ID, "unknown-order-1"),
        (headers::TYPE, "stock.Reserved"),
        (headers::SOURCE, "stock-book"),
        (headers::CONTENT_TYPE, "application/json"),
    ] {
        h.insert(k, v);
    }
    js.publish_with_headers(
        topology.warehouse_subject("reserved"),
        h,
        br#"{"order":"o-999","quantity":1}"#.to_vec().into(),
    )
    .await?
    .await?;
    say("demo: published a malformed message to the warehouse and a reservation of unknown order o-999 to orders".into());

    // Until both inboxes are drained and every order settled.
    let orders_store = SqliteStore::open(&orders_db).await?;
    let order_repo = Repository::<Order, _>::new(orders_store.clone());
    until(
        "every order settled and both inboxes drained",
        wait,
        || async {
            for n in 1..=config.orders {
                let status = order_repo.load(&order_id(n)).await?.state.status;
                if !matches!(status, OrderStatus::Reserved | OrderStatus::OutOfStock) {
                    return Ok(false);
                }
            }
            Ok(drained(&js, &orders_stream, WAREHOUSE_INBOX).await?
                && drained(&js, &warehouse_stream, ORDERS_INBOX).await?)
        },
    )
    .await?;
    orders.stop()?;
    warehouse.stop()?;
    let warehouse_store = SqliteStore::open(&warehouse_db).await?;

    // orders: one Placed and one answer per order.
    let expected: HashSet<String> = (1..=config.orders).map(order_id).collect();
    let mut per_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in all_events(&orders_store).await? {
        let id = e.stream.trim_start_matches("order-").to_owned();
        per_order.entry(id).or_default().push(e.event_type.clone());
    }
    for id in &expected {
        match per_order.get(id).map(Vec::as_slice) {
            Some([placed, answer]) if placed == "order.Placed" => {
                report.placed += 1;
                match answer.as_str() {
                    "order.Reserved" => report.reserved += 1,
                    "order.OutOfStock" => report.out_of_stock += 1,
                    other => report
                        .problems
                        .push(format!("orders: {id} ends with {other}")),
                }
            }
            other => report.problems.push(format!(
                "orders: {id} has events {other:?}, expected Placed + one answer"
            )),
        }
    }
    if per_order.len() != expected.len() {
        report.problems.push(format!(
            "orders: {} order streams, expected {}",
            per_order.len(),
            expected.len()
        ));
    }
    // warehouse: one decision per order; stock conserved.
    let mut decided: BTreeMap<String, usize> = BTreeMap::new();
    let mut reserved_qty: BTreeMap<String, u32> = BTreeMap::new();
    for e in all_events(&warehouse_store).await? {
        let payload: serde_json::Value = serde_json::from_slice(&e.payload)?;
        if e.event_type == "stock.Restocked" {
            continue;
        }
        let order = payload["order"].as_str().unwrap_or_default().to_owned();
        *decided.entry(order).or_default() += 1;
        if e.event_type == "stock.Reserved" {
            *reserved_qty
                .entry(e.stream.trim_start_matches("stock-").to_owned())
                .or_default() += payload["quantity"].as_u64().unwrap_or(0) as u32;
        }
    }
    for id in &expected {
        if decided.get(id) != Some(&1) {
            report.problems.push(format!(
                "warehouse: {id} decided {} times",
                decided.get(id).unwrap_or(&0)
            ));
        }
    }
    if decided.len() != expected.len() {
        report.problems.push(format!(
            "warehouse: decisions for {} orders, expected {}",
            decided.len(),
            expected.len()
        ));
    }
    let stocks = Repository::<Stock, _>::new(warehouse_store.clone());
    for (sku, initial) in SKUS {
        let available = stocks.load(sku).await?.state.available;
        let reserved = reserved_qty.get(sku).copied().unwrap_or(0);
        if available + reserved != initial {
            report.problems.push(format!(
                "warehouse: {sku}: {available} available + {reserved} reserved != {initial} stocked"
            ));
        }
    }
    report.parked_in_warehouse = warehouse_store.parked_messages(None).await?;
    report.parked_in_orders = orders_store.parked_messages(None).await?;
    let parked_ids = |parked: &[ParkedMessage]| -> Vec<String> {
        parked.iter().map(|m| m.message_id.clone()).collect()
    };
    if parked_ids(&report.parked_in_warehouse) != ["malformed-1"] {
        report.problems.push(format!(
            "warehouse parked {:?}, expected the malformed message only",
            parked_ids(&report.parked_in_warehouse)
        ));
    }
    if parked_ids(&report.parked_in_orders) != ["unknown-order-1"] {
        report.problems.push(format!(
            "orders parked {:?}, expected the unknown order's reservation only",
            parked_ids(&report.parked_in_orders)
        ));
    }
    report
        .output
        .insert("orders".into(), orders.lines.lock().unwrap().clone());
    report
        .output
        .insert("warehouse".into(), warehouse.lines.lock().unwrap().clone());

    if config.echo {
        println!("\n== what each side holds");
        println!(
            "orders:    {} orders, each placed once and settled once ({} reserved, {} out of stock)",
            report.placed, report.reserved, report.out_of_stock
        );
        println!(
            "warehouse: {} orders, each decided once; stock conserved ({})",
            decided.len(),
            SKUS.iter()
                .map(|(sku, n)| format!(
                    "{sku}: {} of {n} reserved",
                    reserved_qty.get(*sku).unwrap_or(&0)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (side, parked) in [
            ("warehouse", &report.parked_in_warehouse),
            ("orders", &report.parked_in_orders),
        ] {
            for m in parked {
                println!(
                    "parked in {side}: {} on {}: {}\n    raw bytes: b\"{}\"",
                    m.message_id,
                    m.subject,
                    m.error,
                    m.payload.escape_ascii()
                );
            }
        }
        if report.ok() {
            println!(
                "every order handled once on both sides, despite {} SIGKILLs and {} duplicate copies ({:?})",
                report.kills.len(),
                report.dropped_by_jetstream + report.copies_stored,
                started.elapsed()
            );
        } else {
            println!("PROBLEMS: {:#?}", report.problems);
        }
    }
    topology.delete_streams(&js).await?;
    Ok(report)
}
