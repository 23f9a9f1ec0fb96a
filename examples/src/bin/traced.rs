//! One trace per order across two processes, and metrics for Prometheus.
//!
//! ```text
//! cargo run -p aftermath-examples --bin traced            # the demo below
//! cargo run -p aftermath-examples --bin traced -- worker DB PORT
//! cargo run -p aftermath-examples --bin traced -- api DB
//! ```
//!
//! The demo runs the fulfillment saga in two processes on one SQLite file:
//! an **API process** that places orders, each inside the span of its HTTP
//! request (`POST /orders`), and a **worker process** that runs the saga,
//! its reactors and a read model, and serves its metrics on
//! `http://127.0.0.1:PORT/metrics` (Prometheus text format). Both export
//! their spans with OpenTelemetry: to the OTLP collector at
//! `OTEL_EXPORTER_OTLP_ENDPOINT` when that is set (Jaeger, Tempo, an
//! OpenTelemetry Collector: `http://localhost:4318`), otherwise as one JSON
//! line per span on stdout, which the demo collects and draws: the order's
//! trace, from the API's request span through the saga's commands and the
//! compensation to the mail reactor's effect in the worker, joined by the
//! W3C trace context stored with every event.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aftermath::prelude::*;
use aftermath::process::ProcessRunner;
use aftermath::reactor::ReactorRunner;
use aftermath::worker::Worker;
use aftermath_examples::fulfillment::reactors::{CustomerMail, Mailbox};
use aftermath_examples::fulfillment::*;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The orders the API places: a card the payment refuses (the saga
/// compensates: releases the stock, cancels), and more than the stock.
const ORDERS: [(&str, &str, u32); 2] = [("declined", "declined", 2), ("too-many", "visa-4242", 50)];

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.first().map(String::as_str) {
        None => runtime.block_on(demo()),
        Some("worker") if args.len() == 3 => runtime.block_on(worker(&args[1], args[2].parse()?)),
        Some("api") if args.len() == 2 => runtime.block_on(api(&args[1])),
        _ => Err("usage: traced [worker DB PORT | api DB]".into()),
    }
}

// ---------------------------------------------------------------------------
// Telemetry: OTLP when configured, else JSON lines on stdout.
// ---------------------------------------------------------------------------

/// One finished span, as the stdout exporter prints it (after `span `).
#[derive(Debug, Serialize, Deserialize)]
struct SpanLine {
    process: String,
    trace: String,
    span: String,
    parent: String,
    name: String,
    start_us: u128,
    duration_us: u128,
    attributes: BTreeMap<String, String>,
}

/// Prints each finished span as a `span {json}` line on stdout.
#[derive(Debug)]
struct JsonLines {
    process: &'static str,
}

impl SpanExporter for JsonLines {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut out = std::io::stdout().lock();
        for span in batch {
            let micros = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
            let line = SpanLine {
                process: self.process.to_owned(),
                trace: span.span_context.trace_id().to_string(),
                span: span.span_context.span_id().to_string(),
                parent: span.parent_span_id.to_string(),
                name: span.name.to_string(),
                start_us: micros(span.start_time),
                duration_us: micros(span.end_time).saturating_sub(micros(span.start_time)),
                attributes: span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                    .collect(),
            };
            let json = serde_json::to_string(&line).unwrap_or_default();
            let _ = writeln!(out, "span {json}");
        }
        Ok(())
    }
}

/// Installs `tracing` with the OpenTelemetry layer for `process`; returns
/// the provider to flush at exit.
fn telemetry(process: &'static str) -> Result<SdkTracerProvider, Error> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(process)
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let provider = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        // Reads OTEL_EXPORTER_OTLP_ENDPOINT (and the other OTEL_ variables).
        let otlp = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()?;
        builder.with_batch_exporter(otlp).build()
    } else {
        builder.with_simple_exporter(JsonLines { process }).build()
    };
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer(process)))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(tracing_subscriber::EnvFilter::new(
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )),
        )
        .try_init()?;
    Ok(provider)
}

use tracing_subscriber::Layer as _;

// ---------------------------------------------------------------------------
// The API process.
// ---------------------------------------------------------------------------

/// Places each order inside the span of its (simulated) HTTP request.
async fn api(db: &str) -> Result<(), Error> {
    let provider = telemetry("fulfillment-api")?;
    let store = SqliteStore::open(db).await?;
    let orders = Repository::<Order, _>::new(store.clone());
    for (id, card, quantity) in ORDERS {
        let request = tracing::info_span!(
            "POST /orders",
            otel.kind = "server",
            http.request.method = "POST",
            http.route = "/orders",
            order = id,
        );
        orders
            .execute_with(
                id,
                OrderCommand::Place {
                    order: id.into(),
                    customer: format!("{id}@example.com"),
                    sku: "book-42".into(),
                    quantity,
                    amount: 1_999 * u64::from(quantity),
                    card: card.into(),
                    address: "221B Baker Street".into(),
                },
                CommandMeta::with_id(Uuid::now_v7()).correlation(Uuid::now_v7()),
            )
            .instrument(request)
            .await?;
        println!("placed {id}");
    }
    provider.shutdown()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The worker process.
// ---------------------------------------------------------------------------

/// Runs the saga and the mail reactor, serves `/metrics` on `port` (0: any),
/// prints `metrics http://ADDR/metrics`, and stops when stdin closes.
async fn worker(db: &str, port: u16) -> Result<(), Error> {
    let provider = telemetry("fulfillment-worker")?;
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let store = SqliteStore::open(db).await?;
    let running = Worker::new()
        .with_leases(store.clone(), Duration::from_secs(10))
        .add_subscriber(ProcessRunner::new(
            Fulfillment,
            store.clone(),
            command_bus(&store),
            store.clone(),
            store.clone(),
        ))
        .add_subscriber(ReactorRunner::new(
            CustomerMail {
                mailbox: Mailbox::new(),
            },
            store.clone(),
            store.clone(),
            store.clone(),
        ))
        .start()?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("metrics http://{}/metrics", listener.local_addr()?);
    let serve = {
        let store = store.clone();
        async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                let mut request = [0u8; 1024];
                let n = conn.read(&mut request).await.unwrap_or(0);
                let (status, body) = if request[..n].starts_with(b"GET /metrics ") {
                    // The store's gauges (parked effects, lag as the store
                    // sees it, pending deadlines), then everything rendered.
                    match aftermath::admin::record_metrics(&store).await {
                        Ok(_) => ("200 OK", prometheus.render()),
                        Err(e) => ("503 Service Unavailable", format!("store: {e}\n")),
                    }
                } else {
                    ("404 Not Found", "GET /metrics\n".to_owned())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
            }
        }
    };
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    });
    tokio::select! {
        _ = serve => {}
        _ = stdin_closed => {}
    }
    running.shutdown().await;
    provider.shutdown()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The demo: both processes, then one order's trace and the metrics.
// ---------------------------------------------------------------------------

async fn demo() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("traced.db").display().to_string();
    let exe = std::env::current_exe()?;
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        println!("exporting spans to the OTLP endpoint in OTEL_EXPORTER_OTLP_ENDPOINT");
    }
    let store = SqliteStore::open(&db).await?;
    Repository::<Inventory, _>::new(store.clone())
        .execute(
            "book-42",
            InventoryCommand::Restock {
                sku: "book-42".into(),
                quantity: 10,
            },
        )
        .await?;

    let spans: Arc<Mutex<Vec<SpanLine>>> = Arc::default();
    let mut worker = Command::new(&exe)
        .args(["worker", &db, "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let worker_out = BufReader::new(worker.stdout.take().ok_or("worker stdout")?);
    let collected = spans.clone();
    let reader = std::thread::spawn(move || {
        for line in worker_out.lines().map_while(Result::ok) {
            match line.strip_prefix("span ") {
                Some(json) => {
                    if let Ok(span) = serde_json::from_str(json) {
                        collected.lock().unwrap().push(span);
                    }
                }
                None => {
                    let _ = tx.send(line);
                }
            }
        }
    });
    let metrics_url = rx
        .recv_timeout(Duration::from_secs(60))?
        .strip_prefix("metrics ")
        .ok_or("the worker's first line names its metrics endpoint")?
        .to_owned();
    println!("worker process: saga + mail reactor, metrics on {metrics_url}");

    let api = Command::new(&exe).args(["api", &db]).output()?;
    if !api.status.success() {
        return Err(format!(
            "the API process failed: {}",
            String::from_utf8_lossy(&api.stderr)
        )
        .into());
    }
    for line in String::from_utf8_lossy(&api.stdout).lines() {
        match line.strip_prefix("span ") {
            Some(json) => spans.lock().unwrap().push(serde_json::from_str(json)?),
            None => println!("api process: {line}"),
        }
    }

    // Wait until both orders are cancelled and every subscriber is at the head.
    let orders = Repository::<Order, _>::new(store.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = true;
        for (id, ..) in ORDERS {
            done &= orders.load(id).await?.state.status
                == aftermath_examples::fulfillment::aggregates::OrderStatus::Cancelled;
        }
        if done && aftermath::admin::settled(&store).await?.is_settled() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the orders did not settle within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let metrics = scrape(&metrics_url).await?;
    drop(worker.stdin.take()); // the worker stops when its stdin closes
    worker.wait()?;
    reader.join().map_err(|_| "the reader thread panicked")?;

    let spans = spans.lock().unwrap();
    let Some(root) = spans.iter().find(|s| {
        s.name == "POST /orders"
            && s.attributes.get("order").map(String::as_str) == Some("declined")
    }) else {
        println!("(spans went to the OTLP endpoint; look the order up there)");
        print_metrics(&metrics);
        return Ok(());
    };
    let trace: Vec<&SpanLine> = spans.iter().filter(|s| s.trace == root.trace).collect();
    let processes: std::collections::BTreeSet<&str> =
        trace.iter().map(|s| s.process.as_str()).collect();
    println!(
        "\ntrace {} of order `declined`: {} spans in {} processes ({})",
        root.trace,
        trace.len(),
        processes.len(),
        processes.into_iter().collect::<Vec<_>>().join(", ")
    );
    print_tree(&trace, root, 0, root.start_us);
    print_metrics(&metrics);
    Ok(())
}

fn print_tree(spans: &[&SpanLine], node: &SpanLine, depth: usize, t0: u128) {
    let labels = [
        ("messaging.destination.name", "stream"),
        ("aftermath.target", "target"),
        ("aftermath.outcome", "outcome"),
    ];
    let detail = labels
        .iter()
        .filter_map(|(key, label)| node.attributes.get(*key).map(|v| format!("{label}={v}")))
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "{:>8.1} ms  {}{} [{}] {detail}",
        node.start_us.saturating_sub(t0) as f64 / 1000.0,
        "  ".repeat(depth),
        node.name,
        node.process.trim_start_matches("fulfillment-"),
    );
    let mut children: Vec<&&SpanLine> = spans.iter().filter(|s| s.parent == node.span).collect();
    children.sort_by_key(|s| s.start_us);
    for child in children {
        print_tree(spans, child, depth + 1, t0);
    }
}

fn print_metrics(metrics: &str) {
    println!("\nworker metrics (GET /metrics, excerpt):");
    for line in metrics.lines() {
        let keep = [
            "aftermath_commands_total",
            "aftermath_effect_attempts_total",
            "aftermath_process_commands_total",
            "aftermath_subscriber_lag_events",
            "aftermath_effects_parked",
        ];
        if keep.iter().any(|k| line.starts_with(k)) {
            println!("  {line}");
        }
    }
}

/// `GET` of a plain-HTTP URL on this machine.
async fn scrape(url: &str) -> Result<String, Error> {
    let rest = url.strip_prefix("http://").ok_or("an http:// URL")?;
    let (addr, path) = rest.split_once('/').ok_or("a path")?;
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(
        format!("GET /{path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = String::new();
    conn.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("an HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {url}: {}", head.lines().next().unwrap_or_default()).into());
    }
    Ok(body.to_owned())
}
