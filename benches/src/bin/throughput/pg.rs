//! The PostgreSQL rows, beside plain sqlx on the same server
//! (`aftermath_benches::raw_pg`): appends with 1 and 8 writers, the
//! repository, catch-up reads and live latency. Only with
//! `AFTERMATH_PG_URL`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aftermath::projection::{ProjectionOptions, ProjectionRunner};
use aftermath::subscription::{CatchUp, SubscriptionOptions};
use aftermath::{
    EventStore, ExpectedVersion, Position, PostgresOptions, PostgresStore, Repository,
};
use aftermath_benches::domain::{Account, AccountCommand, AccountEvent, fold_raw};
use aftermath_benches::live::{LiveOptions, RawWake, framework_latency, raw_pg_latency};
use aftermath_benches::pg_projections::{PgNoOp, PgTotals};
use aftermath_benches::raw_pg::RawPg;
use aftermath_benches::{
    bench_schema, deposits, drop_store_schema, pg_url, read_all_count, store_event_count,
};
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use super::{Plan, Result, Tally, header, latency_row, rounded, row, skipped, verdict};

/// Connections of each side's pool.
const POOL: u32 = 10;

/// Runs the PostgreSQL section (or prints why not).
pub(crate) fn run(rt: &tokio::runtime::Runtime, plan: &Plan) -> Result<()> {
    println!();
    let Some(url) = pg_url() else {
        println!("== PostgreSQL");
        skipped(
            "PostgreSQL rows",
            "AFTERMATH_PG_URL is not set (e.g. postgres://postgres@127.0.0.1:5432/test)",
        );
        return Ok(());
    };
    rt.block_on(section(&url, plan))
}

async fn section(url: &str, plan: &Plan) -> Result<()> {
    let schema = bench_schema("am");
    let raw_schema = bench_schema("raw");
    let store = PostgresStore::connect_with(
        url,
        PostgresOptions::default()
            .schema(&schema)
            .max_connections(POOL),
    )
    .await?;
    let raw = match RawPg::create(url, &raw_schema, POOL).await {
        Ok(raw) => raw,
        Err(e) => {
            let _ = drop_store_schema(store).await;
            return Err(e.into());
        }
    };
    let outcome = rows(url, plan, &store, &raw).await;
    // Clean up whatever happened.
    let dropped = drop_store_schema(store).await;
    let raw_dropped = raw.drop_schema().await;
    outcome?;
    dropped?;
    raw_dropped?;
    Ok(())
}

/// The server's version and the settings that decide commit cost.
async fn server_settings(raw: &RawPg) -> Result<String> {
    use aftermath::store::postgres::sqlx_core::{query::query, row::Row};
    let row = query(
        "SELECT current_setting('server_version'), current_setting('synchronous_commit'), \
                current_setting('fsync'), current_setting('commit_delay')",
    )
    .fetch_one(raw.pool())
    .await?;
    Ok(format!(
        "PostgreSQL {}, synchronous_commit={}, fsync={}, commit_delay={}",
        row.try_get::<String, _>(0)?,
        row.try_get::<String, _>(1)?,
        row.try_get::<String, _>(2)?,
        row.try_get::<String, _>(3)?,
    ))
}

/// Runs `tasks` copies of `work` (given the task's index and the deadline)
/// concurrently; each returns how many items it did. The tally's time is
/// the wall time.
async fn concurrently<F, Fut>(tasks: usize, budget: Duration, work: F) -> Result<Tally>
where
    F: Fn(usize, Instant) -> Fut,
    Fut: Future<Output = Result<u64>> + Send + 'static,
{
    let began = Instant::now();
    let deadline = began + budget;
    let handles: Vec<_> = (0..tasks)
        .map(|task| tokio::spawn(work(task, deadline)))
        .collect();
    let mut items = 0;
    for handle in handles {
        items += handle.await??;
    }
    Ok(Tally {
        items,
        time: began.elapsed(),
    })
}

/// Alternates `a` and `b` for `plan.rounds` rounds after a short warm-up
/// of each; returns both tallies.
async fn alternate<A, AF, B, BF>(plan: &Plan, a: A, b: B) -> Result<(Tally, Tally)>
where
    A: Fn(Duration) -> AF,
    AF: Future<Output = Result<Tally>>,
    B: Fn(Duration) -> BF,
    BF: Future<Output = Result<Tally>>,
{
    alternate_rounds(plan, plan.rounds, a, b).await
}

/// [`alternate`] over `rounds` rounds of the plan's length: for rows whose
/// rounds vary more than others (commands of 8 clients against a server
/// whose autovacuum and checkpoints come and go).
async fn alternate_rounds<A, AF, B, BF>(
    plan: &Plan,
    rounds: u32,
    a: A,
    b: B,
) -> Result<(Tally, Tally)>
where
    A: Fn(Duration) -> AF,
    AF: Future<Output = Result<Tally>>,
    B: Fn(Duration) -> BF,
    BF: Future<Output = Result<Tally>>,
{
    a(plan.round() / 4).await?;
    b(plan.round() / 4).await?;
    let (mut x, mut y) = (Tally::default(), Tally::default());
    for _ in 0..rounds {
        x.add(a(plan.round()).await?);
        y.add(b(plan.round()).await?);
    }
    Ok((x, y))
}

/// A unique stream name.
fn stream(prefix: &str, task: usize) -> String {
    format!("{prefix}-{task}-{}", Uuid::now_v7().simple())
}

/// `tasks` writers appending `batch`-event batches through `store`, each to
/// its own stream, with the expected version.
async fn store_appends(
    store: &PostgresStore,
    batch: usize,
    tasks: usize,
    budget: Duration,
) -> Result<Tally> {
    concurrently(tasks, budget, |task, deadline| {
        let store = store.clone();
        async move {
            let stream = stream(&format!("fw{batch}"), task);
            let (mut version, mut appended) = (0, 0u64);
            while Instant::now() < deadline {
                let events = deposits(batch);
                let done = store
                    .append(&stream, ExpectedVersion::Exact(version), events)
                    .await?;
                version = done.last_version;
                appended += batch as u64;
            }
            Ok(appended)
        }
    })
    .await
}

/// The same with plain sqlx.
async fn raw_appends(raw: &RawPg, batch: usize, tasks: usize, budget: Duration) -> Result<Tally> {
    concurrently(tasks, budget, |task, deadline| {
        let raw = raw.clone();
        async move {
            let stream = stream(&format!("raw{batch}"), task);
            let (mut version, mut appended) = (0, 0u64);
            while Instant::now() < deadline {
                let events = deposits(batch);
                version = raw
                    .append(&stream, ExpectedVersion::Exact(version), &events)
                    .await?;
                appended += batch as u64;
            }
            Ok(appended)
        }
    })
    .await
}

/// `tasks` clients executing `Open` on fresh accounts through a repository.
async fn store_executes(store: &PostgresStore, tasks: usize, budget: Duration) -> Result<Tally> {
    let repo = Arc::new(Repository::<Account, _>::new(store.clone()));
    concurrently(tasks, budget, |task, deadline| {
        let repo = repo.clone();
        async move {
            let prefix = format!("fresh{task}-{}", Uuid::now_v7().simple());
            let mut n = 0u64;
            while Instant::now() < deadline {
                let id = format!("{prefix}-{n}");
                let owner = id.clone();
                repo.execute(&id, AccountCommand::Open { owner }).await?;
                n += 1;
            }
            Ok(n)
        }
    })
    .await
}

/// `store_executes` with a fresh command id on every command.
async fn store_executes_with_ids(
    store: &PostgresStore,
    tasks: usize,
    budget: Duration,
) -> Result<Tally> {
    let repo = Arc::new(Repository::<Account, _>::new(store.clone()));
    concurrently(tasks, budget, |task, deadline| {
        let repo = repo.clone();
        async move {
            let prefix = format!("withid{task}-{}", Uuid::now_v7().simple());
            let mut n = 0u64;
            while Instant::now() < deadline {
                let id = format!("{prefix}-{n}");
                let owner = id.clone();
                let meta = aftermath::CommandMeta::with_id(Uuid::now_v7());
                repo.execute_with(&id, AccountCommand::Open { owner }, meta)
                    .await?;
                n += 1;
            }
            Ok(n)
        }
    })
    .await
}

/// Events in the stream of [`long_stream_command`].
const LONG_STREAM: usize = 10_000;

/// One command at a time on an aggregate with a 10k-event stream and no
/// snapshots (load all, fold, decide, append), beside the hand-written
/// handler on a stream of the same length: mean and p99 time per command.
async fn long_stream_command(store: &PostgresStore, raw: &RawPg) -> Result<()> {
    let id = format!("long-{}", Uuid::now_v7().simple());
    let stream = format!("account-{id}");
    let raw_stream = format!("raw-{stream}");
    let opened = aftermath::EventData::fresh(&AccountEvent::Opened { owner: id.clone() })?;
    let mut version = store
        .append(&stream, ExpectedVersion::NoStream, vec![opened.clone()])
        .await?
        .last_version;
    let opened = aftermath::EventData {
        id: Uuid::now_v7(),
        ..opened
    };
    raw.append(&raw_stream, ExpectedVersion::NoStream, &[opened])
        .await?;
    for _ in 0..LONG_STREAM / 1000 {
        version = store
            .append(&stream, ExpectedVersion::Exact(version), deposits(1000))
            .await?
            .last_version;
        raw.append(&raw_stream, ExpectedVersion::Any, &deposits(1000))
            .await?;
    }
    let repo = Repository::<Account, _>::new(store.clone());
    let rounds = 30;
    let (mut fw, mut base) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let began = Instant::now();
        repo.execute(&id, AccountCommand::Deposit { amount: 1 })
            .await?;
        fw.push(began.elapsed());
        let began = Instant::now();
        raw.execute(&raw_stream, |history| {
            let state = fold_raw(history).expect("the raw stream decodes");
            aftermath::Aggregate::decide(&state, AccountCommand::Deposit { amount: 1 })
                .expect("a deposit is accepted")
                .iter()
                .map(|e: &AccountEvent| aftermath::EventData::fresh(e).expect("an event encodes"))
                .collect()
        })
        .await?;
        base.push(began.elapsed());
    }
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    let p99 = |v: &mut Vec<Duration>| {
        v.sort_unstable();
        v[(v.len() * 99).div_ceil(100) - 1]
    };
    let (fw_mean, base_mean) = (mean(&fw), mean(&base));
    latency_row(
        &format!(
            "Postgres execute on a {}-event stream, mean",
            rounded(LONG_STREAM as f64)
        ),
        fw_mean,
        Some(base_mean),
        &format!(
            "{rounds} commands, no snapshots; {:.2}x raw; {}",
            fw_mean.as_secs_f64() / base_mean.as_secs_f64(),
            verdict(
                "<= 1.3x raw",
                fw_mean.as_secs_f64() <= 1.3 * base_mean.as_secs_f64()
            )
        ),
    );
    latency_row(
        &format!(
            "Postgres execute on a {}-event stream, p99",
            rounded(LONG_STREAM as f64)
        ),
        p99(&mut fw),
        Some(p99(&mut base)),
        "",
    );
    Ok(())
}

/// The same as a hand-written command handler (`RawPg::execute`): load the
/// stream's rows, fold, decide, insert, one transaction.
async fn raw_executes(raw: &RawPg, tasks: usize, budget: Duration) -> Result<Tally> {
    concurrently(tasks, budget, |task, deadline| {
        let raw = raw.clone();
        async move {
            let prefix = format!("account-rawfresh{task}-{}", Uuid::now_v7().simple());
            let mut n = 0u64;
            while Instant::now() < deadline {
                let stream = format!("{prefix}-{n}");
                let owner = stream.clone();
                let mut refused = None;
                raw.execute(&stream, |history| {
                    let decided = fold_raw(history).map_err(|e| e.to_string()).and_then(|s| {
                        aftermath::Aggregate::decide(&s, AccountCommand::Open { owner })
                            .map_err(|e| e.to_string())
                    });
                    match decided {
                        Ok(events) => events
                            .iter()
                            .map(|e: &AccountEvent| {
                                aftermath::EventData::fresh(e).expect("an event encodes")
                            })
                            .collect(),
                        Err(e) => {
                            refused = Some(e);
                            Vec::new()
                        }
                    }
                })
                .await?;
                if let Some(e) = refused {
                    return Err(format!("raw command refused: {e}").into());
                }
                n += 1;
            }
            Ok(n)
        }
    })
    .await
}

/// Appends 1,000-event batches until the store holds at least `target`
/// events.
async fn top_up_store(store: &PostgresStore, target: u64) -> Result<()> {
    let mut have = store_event_count(store).await?;
    let stream = stream("fill", 0);
    let mut version = 0;
    while have < target {
        let done = store
            .append(&stream, ExpectedVersion::Exact(version), deposits(1000))
            .await?;
        version = done.last_version;
        have += 1000;
    }
    Ok(())
}

/// The same for the raw table.
async fn top_up_raw(raw: &RawPg, target: u64) -> Result<()> {
    let mut have = raw.count().await?;
    let stream = stream("fill", 0);
    let mut version = 0;
    while have < target {
        version = raw
            .append(&stream, ExpectedVersion::Exact(version), &deposits(1000))
            .await?;
        have += 1000;
    }
    Ok(())
}

async fn rows(url: &str, plan: &Plan, store: &PostgresStore, raw: &RawPg) -> Result<()> {
    println!(
        "== {}; baseline = plain sqlx, same server, equivalent table in its own schema; pools of {POOL}",
        server_settings(raw).await?
    );
    header();

    // Appends: 1 and 100 events per batch, 1 and `plan.tasks` writers.
    let mut single = [0.0f64; 2];
    for tasks in [1, plan.tasks] {
        for (i, batch) in [1usize, 100].into_iter().enumerate() {
            let (fw, base) = alternate(
                plan,
                |budget| store_appends(store, batch, tasks, budget),
                |budget| raw_appends(raw, batch, tasks, budget),
            )
            .await?;
            let writers = if tasks == 1 {
                "1 writer".to_owned()
            } else {
                format!("{tasks} writers")
            };
            let mut notes = Vec::new();
            if tasks == 1 {
                single[i] = fw.rate();
                if batch > 1 {
                    notes.push(verdict(">= 70%", fw.rate() >= 0.7 * base.rate()));
                }
            } else {
                let scale = fw.rate() / single[i];
                notes.push(format!(
                    "{scale:.1}x 1 writer, {}",
                    verdict(">= 3x", scale >= 3.0)
                ));
            }
            row(
                &format!("Postgres append, {batch} event(s)/batch, {writers}"),
                "events/s",
                fw.rate(),
                Some(base.rate()),
                &notes.join("; "),
            );
        }
    }

    // The same store without NOTIFY: PostgreSQL serializes the commits of
    // notifying transactions, so this shows what NOTIFY costs writers.
    let quiet = PostgresStore::connect_with(
        url,
        PostgresOptions::default()
            .schema(store.schema())
            .max_connections(POOL)
            .notify(false),
    )
    .await?;
    let mut quiet_single = 0.0;
    for tasks in [1, plan.tasks] {
        store_appends(&quiet, 1, tasks, plan.round() / 4).await?;
        let fw = store_appends(&quiet, 1, tasks, plan.budget).await?;
        let base = raw_appends(raw, 1, tasks, plan.budget).await?;
        let note = if tasks == 1 {
            quiet_single = fw.rate();
            "notify(false): other processes learn by poll".to_owned()
        } else {
            format!("{:.1}x 1 writer without NOTIFY", fw.rate() / quiet_single)
        };
        row(
            &format!("Postgres append, 1 event/batch, {tasks} writer(s), no NOTIFY"),
            "events/s",
            fw.rate(),
            Some(base.rate()),
            &note,
        );
    }
    drop(quiet);

    // The repository, over three times the rounds of other rows.
    for tasks in [1, plan.tasks] {
        let (fw, base) = alternate_rounds(
            plan,
            3 * plan.rounds,
            |budget| store_executes(store, tasks, budget),
            |budget| raw_executes(raw, tasks, budget),
        )
        .await?;
        row(
            &format!("Postgres execute, fresh aggregate, {tasks} client(s)"),
            "commands/s",
            fw.rate(),
            Some(base.rate()),
            &format!(
                "load + decide + append; baseline: 1 tx: SELECT rows, INSERT; {}",
                verdict(">= 90%", fw.rate() >= 0.9 * base.rate())
            ),
        );
    }

    // The idempotent path: every command carries an id (a resent command
    // is looked up first), beside the plain path of the same run.
    let (plain, with_id) = alternate(
        plan,
        |budget| store_executes(store, plan.tasks, budget),
        |budget| store_executes_with_ids(store, plan.tasks, budget),
    )
    .await?;
    row(
        &format!("Postgres execute with a command id, {} clients", plan.tasks),
        "commands/s",
        with_id.rate(),
        Some(plain.rate()),
        &format!(
            "baseline: the same without ids; {}",
            verdict(">= 85%", with_id.rate() >= 0.85 * plain.rate())
        ),
    );
    long_stream_command(store, raw).await?;

    // Catch-up reads of everything appended so far (topped up to the
    // plan's size), the same number of events on both sides.
    top_up_store(store, plan.pg_read_events).await?;
    top_up_raw(raw, plan.pg_read_events).await?;
    let max = plan.pg_read_events;
    read_all_count(store, plan.page, max.min(10_000)).await?;
    raw.read_all_count(plan.page, max.min(10_000)).await?;
    let (mut fw, mut base) = (Tally::default(), Tally::default());
    while fw.time < plan.budget || base.time < plan.budget {
        let began = Instant::now();
        let n = read_all_count(store, plan.page, max).await?;
        fw.record(n as usize, began.elapsed());
        let began = Instant::now();
        let n = raw.read_all_count(plan.page, max).await?;
        base.record(n as usize, began.elapsed());
    }
    row(
        &format!("Postgres catch-up read $all, pages of {}", plan.page),
        "events/s",
        fw.rate(),
        Some(base.rate()),
        &format!(
            "{} events, to StoredEvent both sides; {}",
            rounded(max as f64),
            verdict(">= 50%", fw.rate() >= 0.5 * base.rate())
        ),
    );

    let (head, catch_up) = head_and_catch_up(plan, store, base.rate(), max).await?;
    projection_catch_up(plan, store, raw, max).await?;
    live_latency(url, plan, store, raw).await?;
    live_latency_beside_a_projection(url, plan, store).await?;

    // The same after `ANALYZE`: the head query's plan depends on whether
    // the table has planner statistics (see the `head()` row).
    analyze(store, raw).await?;
    println!("  after ANALYZE of both tables:");
    let (head_after, catch_up_after) = head_and_catch_up(plan, store, base.rate(), max).await?;
    let woken = woken_options(plan);
    let fw = framework_latency(store, store.clone(), "live-in", &woken).await?;
    latency_row(
        "Postgres live latency, in-process, p50, after ANALYZE",
        fw.percentile(50.0),
        None,
        &format!("{} samples", fw.len()),
    );
    latency_row(
        "Postgres live latency, in-process, p99, after ANALYZE",
        fw.percentile(99.0),
        None,
        "",
    );
    println!(
        "  (head() {} ms -> {} ms, CatchUp {} -> {} events/s)",
        super::millis(head),
        super::millis(head_after),
        rounded(catch_up),
        rounded(catch_up_after)
    );
    Ok(())
}

/// `ANALYZE` of the store's and the baseline's events tables.
async fn analyze(store: &PostgresStore, raw: &RawPg) -> Result<()> {
    use aftermath::store::postgres::sqlx_core::{
        executor::Executor, raw_sql::raw_sql, sql_str::AssertSqlSafe,
    };
    let sql = format!(
        "ANALYZE \"{}\".events; ANALYZE \"{}\".events",
        store.schema(),
        raw.schema()
    );
    raw.pool().execute(raw_sql(AssertSqlSafe(sql))).await?;
    Ok(())
}

/// Prints the mean time of `head()` and the rate of a `CatchUp` reader
/// (no-op handler, pages of `plan.page`) over the first `max` events;
/// returns both.
async fn head_and_catch_up(
    plan: &Plan,
    store: &PostgresStore,
    raw_rate: f64,
    max: u64,
) -> Result<(Duration, f64)> {
    let events = store_event_count(store).await?;
    store.head().await?;
    let calls = 20u32;
    let began = Instant::now();
    for _ in 0..calls {
        store.head().await?;
    }
    let head = began.elapsed() / calls;
    latency_row(
        &format!(
            "Postgres head(), {} events in the table",
            rounded(events as f64)
        ),
        head,
        None,
        "mean of 20; CatchUp reads it before every page",
    );
    let options = SubscriptionOptions::default().batch_size(plan.page);
    let mut reader = CatchUp::new(store.clone(), None, Position::ORIGIN, options);
    let began = Instant::now();
    let mut n = 0u64;
    while n < max {
        let page = reader.next_page().await?;
        n += std::hint::black_box(&page.events).len() as u64;
        reader.advance(page.through);
        if page.caught_up {
            break;
        }
    }
    let rate = n as f64 / began.elapsed().as_secs_f64();
    row(
        &format!("Postgres catch-up via CatchUp, pages of {}", plan.page),
        "events/s",
        rate,
        Some(raw_rate),
        &format!(
            "{} events, no-op handler; baseline raw SELECT; {}",
            rounded(n as f64),
            verdict(">= 50%", rate >= 0.5 * raw_rate)
        ),
    );
    Ok((head, rate))
}

/// Checkpointed catch-up through a `ProjectionRunner` with a no-op apply
/// (one transaction and fenced checkpoint per batch of `plan.page`), beside
/// a raw keyset read that commits a checkpoint row per page.
async fn projection_catch_up(
    plan: &Plan,
    store: &PostgresStore,
    raw: &RawPg,
    max: u64,
) -> Result<()> {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let options = ProjectionOptions::default().batch_size(plan.page);
    let (mut fw, mut base) = (Tally::default(), Tally::default());
    while fw.time < plan.budget || base.time < plan.budget {
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let runner = ProjectionRunner::new(
            PgNoOp::new(format!("bench_noop_{run}")),
            store.clone(),
            store.clone(),
        )
        .options(options.clone());
        let began = Instant::now();
        runner.catch_up().await?;
        let n = store_event_count(store).await?;
        fw.record(n as usize, began.elapsed());
        let began = Instant::now();
        let n = raw.read_all_checkpointed(plan.page, max).await?;
        base.record(n as usize, began.elapsed());
    }
    row(
        &format!(
            "Postgres catch-up via ProjectionRunner, no-op apply, batches of {}",
            plan.page
        ),
        "events/s",
        fw.rate(),
        Some(base.rate()),
        &format!(
            "checkpoint per batch; baseline raw keyset read + checkpoint UPSERT per page; {}",
            verdict(">= 80%", fw.rate() >= 0.8 * base.rate())
        ),
    );
    Ok(())
}

/// Live latency while the store is used the way production uses it: a
/// projection writing its read model in its batch transactions (kept busy
/// by a background writer), and an idle-in-transaction session holding a
/// transaction id in another database of the server. Neither may hold the
/// subscriber back.
async fn live_latency_beside_a_projection(
    url: &str,
    plan: &Plan,
    store: &PostgresStore,
) -> Result<()> {
    use aftermath::store::postgres::sqlx_core::{connection::Connection, executor::Executor};
    use aftermath::store::postgres::sqlx_postgres::PgConnection;

    let cut = url.rfind('/').ok_or("no database in the URL")?;
    let mut idle = PgConnection::connect(&format!("{}/postgres", &url[..cut])).await?;
    idle.execute("BEGIN").await?;
    idle.execute("SELECT pg_current_xact_id()").await?;

    let projection = PgTotals::new(store.schema(), "bench_live_totals");
    let runner = ProjectionRunner::new(projection, store.clone(), store.clone())
        .options(ProjectionOptions::default().batch_size(100));
    let worker = aftermath::worker::Worker::new()
        .add_subscriber(runner)
        .start()?;
    let stop = Arc::new(Notify::new());
    let load = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let stream = stream("busy", 0);
            loop {
                tokio::select! {
                    _ = stop.notified() => return Ok::<(), aftermath::StoreError>(()),
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                }
                store
                    .append(&stream, ExpectedVersion::Any, deposits(5))
                    .await?;
            }
        })
    };
    let reader = PostgresStore::connect_with(
        url,
        PostgresOptions::default()
            .schema(store.schema())
            .max_connections(4),
    )
    .await?;
    let measured =
        framework_latency(store, reader.clone(), "live-busy", &woken_options(plan)).await;
    stop.notify_one();
    load.await??;
    worker.shutdown().await;
    idle.execute("ROLLBACK").await?;
    let fw = measured?;
    latency_row(
        "Postgres live latency beside a busy projection + idle xact in another db, p50",
        fw.percentile(50.0),
        None,
        &format!(
            "{} samples; cross-process (NOTIFY); projection upserting in its batch transactions",
            fw.len()
        ),
    );
    latency_row(
        "Postgres live latency beside a busy projection + idle xact in another db, p99",
        fw.percentile(99.0),
        None,
        &verdict(
            "p99 < 20 ms",
            fw.percentile(99.0) < Duration::from_millis(20),
        ),
    );
    Ok(())
}

/// Samples with a reader that is woken (in process or by NOTIFY).
fn woken_options(plan: &Plan) -> LiveOptions {
    LiveOptions {
        samples: plan.live_samples,
        warm_up: 5,
        max_gap: Duration::from_millis(5),
        poll: Duration::from_secs(30),
        timeout: Duration::from_secs(10),
    }
}

/// Append-to-delivery latency, framework and raw: in process (the writer's
/// own handle / a `Notify`), across processes by LISTEN/NOTIFY (a second
/// store handle / a `PgListener`), and across processes by polling (the
/// writer does not notify).
async fn live_latency(url: &str, plan: &Plan, store: &PostgresStore, raw: &RawPg) -> Result<()> {
    let never = Duration::from_secs(30);
    let woken = woken_options(plan);
    let polled = LiveOptions {
        samples: plan.poll_samples,
        warm_up: 2,
        max_gap: plan.poll,
        poll: never,
        timeout: Duration::from_secs(10),
    };
    let schema = store.schema().to_owned();
    let reader_options = || {
        PostgresOptions::default()
            .schema(&schema)
            .max_connections(4)
    };

    // In process: a CatchUp on the writer's handle, woken by watch_head.
    let fw = framework_latency(store, store.clone(), "live-in", &woken).await?;
    let notify = Arc::new(Notify::new());
    let base = raw_pg_latency(
        raw,
        raw.clone(),
        RawWake::InProcess(notify),
        "live-in",
        &woken,
    )
    .await?;
    print_latency(
        "in-process",
        &fw,
        &base,
        &format!(
            "{} samples; watch_head / baseline: tokio Notify + SELECT",
            fw.len()
        ),
    );

    // Across processes by LISTEN/NOTIFY: a second handle that polls only
    // every 30 s, so NOTIFY is what wakes it.
    let reader = PostgresStore::connect_with(url, reader_options().poll_interval(never)).await?;
    let fw = framework_latency(store, reader.clone(), "live-listen", &woken).await?;
    drop(reader);
    let channel = format!("{}_events", raw.schema());
    let writer = raw.clone().with_notify(&channel);
    let reader = RawPg::connect(url, raw.schema(), 4).await?;
    let base = raw_pg_latency(
        &writer,
        reader.clone(),
        RawWake::Listen(channel),
        "live-listen",
        &woken,
    )
    .await?;
    reader.close().await;
    print_latency(
        "cross-process, LISTEN/NOTIFY",
        &fw,
        &base,
        &format!(
            "{} samples; 2nd store handle / baseline: pg_notify + PgListener + SELECT",
            fw.len()
        ),
    );

    // Across processes by polling: the writer does not notify; the second
    // handle's background task re-reads the head every `plan.poll`.
    let quiet = PostgresStore::connect_with(
        url,
        PostgresOptions::default()
            .schema(&schema)
            .max_connections(4)
            .notify(false),
    )
    .await?;
    let reader =
        PostgresStore::connect_with(url, reader_options().poll_interval(plan.poll)).await?;
    let fw = framework_latency(&quiet, reader.clone(), "live-poll", &polled).await?;
    drop(reader);
    drop(quiet);
    let reader = RawPg::connect(url, raw.schema(), 4).await?;
    let base = raw_pg_latency(
        raw,
        reader.clone(),
        RawWake::Poll(plan.poll),
        "live-poll",
        &polled,
    )
    .await?;
    reader.close().await;
    print_latency(
        "cross-process, poll",
        &fw,
        &base,
        &format!(
            "{} samples; notify off, store poll_interval {} ms (default 1 s) / baseline: SELECT every {} ms",
            fw.len(),
            plan.poll.as_millis(),
            plan.poll.as_millis()
        ),
    );
    Ok(())
}

fn print_latency(
    path: &str,
    fw: &aftermath_benches::live::Latencies,
    base: &aftermath_benches::live::Latencies,
    note: &str,
) {
    latency_row(
        &format!("Postgres live latency, {path}, p50"),
        fw.percentile(50.0),
        Some(base.percentile(50.0)),
        note,
    );
    latency_row(
        &format!("Postgres live latency, {path}, p99"),
        fw.percentile(99.0),
        Some(base.percentile(99.0)),
        "",
    );
}
