//! The two-service example (`examples/src/two_services`) under SIGKILL
//! loops: `orders` and `warehouse` run as processes on their own SQLite
//! files and one NATS server, each is SIGKILLed mid-flight three times,
//! duplicates (with and without `Nats-Msg-Id`), a malformed message and an
//! answer about an unknown order are injected. The binaries are the
//! example's code (`two_services::orders_main` / `warehouse_main`) built in
//! this package as `two_services_orders` / `two_services_warehouse`.
//!
//! Runs when `AFTERMATH_NATS_URL` is set; otherwise prints `SKIPPED`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aftermath_examples::two_services::demo::{DemoConfig, run};
use aftermath_tests::nats::url_or_skip;

/// Each order once in each service's store (one `order.Placed` and one
/// answer in `orders`, one reservation decision in `warehouse`), each
/// effect once (stock conserved: available + reserved = stocked), the
/// malformed message parked in `warehouse` with its raw bytes, the answer
/// about an unknown order parked in `orders` as rejected, nothing lost
/// (every order settled), after 3 SIGKILLs of each service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_survive_sigkill_loops_duplicates_and_malformed_messages() {
    let Some(url) =
        url_or_skip("two_services_survive_sigkill_loops_duplicates_and_malformed_messages")
    else {
        return;
    };
    let started = Instant::now();
    let config = DemoConfig {
        orders_exe: PathBuf::from(env!("CARGO_BIN_EXE_two_services_orders")),
        warehouse_exe: PathBuf::from(env!("CARGO_BIN_EXE_two_services_warehouse")),
        url,
        orders: 40,
        kill_rounds: 3,
        echo: false,
    };
    let report = run(&config).await.expect("the demo ran");
    assert!(
        report.problems.is_empty(),
        "{:#?}\n{:#?}",
        report.problems,
        report.output
    );
    assert_eq!(report.kills.len(), 6, "{:?}", report.kills);
    assert_eq!(report.placed, 40);
    assert_eq!(report.reserved + report.out_of_stock, 40);
    assert!(report.reserved > 0 && report.out_of_stock > 0, "{report:?}");
    assert_eq!(
        (report.dropped_by_jetstream, report.copies_stored),
        (8, 8),
        "copies with Nats-Msg-Id dropped by JetStream, copies without stored (and absorbed by the inboxes)"
    );
    let parked: BTreeMap<&str, (&str, &[u8], &str)> = report
        .parked_in_warehouse
        .iter()
        .chain(&report.parked_in_orders)
        .map(|m| {
            (
                m.message_id.as_str(),
                (m.inbox.as_str(), m.payload.as_slice(), m.error.as_str()),
            )
        })
        .collect();
    let (inbox, payload, error) = parked["malformed-1"];
    assert_eq!(inbox, "warehouse-inbox");
    assert_eq!(payload, b"\xff\xfe{ not an order", "raw bytes kept");
    assert!(error.contains("no `ce-specversion` header"), "{error}");
    let (inbox, _, error) = parked["unknown-order-1"];
    assert_eq!(inbox, "orders-inbox");
    assert!(
        error.contains("rejected by order `o-999`: no such order was placed"),
        "{error}"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(60), "took {took:?}");
    eprintln!("{:?}; {took:?}", report.kills);
}
