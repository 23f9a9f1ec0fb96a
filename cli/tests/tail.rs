//! `aftermath tail` run as a process: it follows `$all` live, with its
//! filters, until it is killed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use aftermath::{EventData, EventStore, ExpectedVersion, SqliteStore};
use common::OrderEvent;

/// A running `tail`; its stdout lines arrive on `lines`. Killed on drop.
struct Tail {
    child: Child,
    lines: Receiver<String>,
}

impl Tail {
    fn start(path: &Path, args: &[&str]) -> Tail {
        let mut child = Command::new(env!("CARGO_BIN_EXE_aftermath"))
            .env_remove("AFTERMATH_SQLITE")
            .env_remove("AFTERMATH_PG_URL")
            .arg("--sqlite")
            .arg(path)
            .arg("tail")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // It says so on stderr once it knows where it starts.
        let mut started = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut started)
            .unwrap();
        assert!(
            started.starts_with("following $all after position"),
            "{started}"
        );
        let (tx, lines) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Tail { child, lines }
    }

    /// The next `n` lines, within 15 s.
    fn take(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        (0..n)
            .map(|i| {
                self.lines
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(|_| panic!("line {} of {n} never came", i + 1))
            })
            .collect()
    }

    /// Nothing more within a moment.
    fn quiet(&self) {
        if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(800)) {
            panic!("unexpected line: {line}");
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tail_follows_all_live_with_type_and_category_filters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = runtime.block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        common::fill(&store).await;
        store
    });

    let everything = Tail::start(&path, &[]);
    let invoices = Tail::start(&path, &["--category", "invoice", "--json"]);
    let confirmed = Tail::start(&path, &["--from", "0", "--type", "order.Confirmed"]);

    // From the start: the two confirmations already in the log, nothing else.
    let old = confirmed.take(2);
    assert!(old[0].contains("order-o-1 v2  order.Confirmed"), "{old:?}");
    assert!(old[1].contains("order-o-2 v2  order.Confirmed"), "{old:?}");
    everything.quiet();

    let append = |stream: &str, event: OrderEvent| {
        runtime.block_on(async {
            store
                .append(
                    stream,
                    ExpectedVersion::Any,
                    vec![EventData::fresh(&event).unwrap()],
                )
                .await
                .unwrap()
        })
    };
    append("order-o-3", OrderEvent::Placed { items: 1 });
    append("invoice-i-1", OrderEvent::Confirmed {});

    let new = everything.take(2);
    assert!(new[0].contains("order-o-3 v1  order.Placed"), "{new:?}");
    assert!(new[0].starts_with("@5  "), "{new:?}");
    assert!(
        new[1].contains("invoice-i-1 v1  order.Confirmed"),
        "{new:?}"
    );
    let line = invoices.take(1);
    let json: serde_json::Value = serde_json::from_str(&line[0]).unwrap();
    assert_eq!(json["stream"], "invoice-i-1");
    assert_eq!(json["event_type"], "order.Confirmed");
    assert_eq!(json["position"], 6);
    let later = confirmed.take(1);
    assert!(
        later[0].contains("invoice-i-1 v1  order.Confirmed"),
        "{later:?}"
    );
    everything.quiet();
    invoices.quiet();
    confirmed.quiet();
}
