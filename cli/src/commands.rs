//! The subcommands, each generic over the backend (see
//! [`aftermath::admin::Admin`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use aftermath::admin::{self, Admin, Report, SubscriberState};
use aftermath::process::{TimelineEntry, describe_record, timeline};
use aftermath::{Direction, Position, StoredEvent};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::store::{Store, Target, Versions};
use crate::table::{Table, colors, cut, paint, seconds};
use crate::{Cli, Command, Failure, NOT_SETTLED, OK, with_store};

/// Runs the command of `cli` on `target`; the exit code, or the failure.
pub async fn run(cli: Cli, target: Target) -> Result<u8, Failure> {
    let migrate = if let Command::Migrate { yes } = cli.command {
        confirm(
            "Migrate the store to this build's schema version? Applications of an older aftermath will refuse it.",
            yes,
        )?;
        true
    } else {
        false
    };
    let (store, versions) = Store::open(&target, &cli.schema, migrate).await?;
    let json = cli.json;
    let describe = store.describe();
    if let Command::Console { bind, port, token } = cli.command {
        return crate::console::serve(store, describe, bind, port, token).await;
    }
    with_store!(&store, s => match cli.command {
        Command::Status { watch } => status(s, &describe, json, watch).await,
        Command::DeadLetters { reactor } => dead_letters(s, reactor.as_deref(), json).await,
        Command::Retry { reactor, event_id, all, yes } => {
            release(s, &reactor, event_id, all, yes, false, json).await
        }
        Command::Skip { reactor, event_id, yes } => {
            release(s, &reactor, Some(event_id), false, yes, true, json).await
        }
        Command::RetryProcess { stream, yes } => release_process(s, &stream, yes, false, json).await,
        Command::SkipProcess { stream, yes } => release_process(s, &stream, yes, true, json).await,
        Command::Timeline { correlation_id, stream, event, mermaid } => {
            let id = conversation(s, correlation_id, stream.as_deref(), event).await?;
            show_timeline(s, id, json, mermaid).await
        }
        Command::Streams { category, limit } => streams(s, category.as_deref(), limit, json).await,
        Command::Stream { name, from, limit } => stream(s, &name, from, limit, json).await,
        Command::Deadlines { limit } => deadlines(s, limit, json).await,
        Command::Processes { process, state, limit } => {
            processes(s, process.as_deref(), state.as_deref(), limit, json).await
        }
        Command::Tail { types, categories, from } => {
            tail(s, &types, &categories, from, json).await
        }
        Command::Console { .. } => unreachable!("served above"),
        Command::Check => check(&describe, versions, json),
        Command::Migrate { .. } => migrated(&describe, versions, json),
    })
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::error(format!("cannot print JSON: {e}")))?;
    outln!("{text}");
    Ok(())
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

// ---------------------------------------------------------------- status

async fn status<S: Admin>(s: &S, describe: &str, json: bool, watch: bool) -> Result<u8, Failure> {
    let clear = watch && !json && std::io::stdout().is_terminal();
    loop {
        let report = admin::settled(s).await?;
        if json {
            let value = status_json(&report, describe);
            if watch {
                outln!("{value}");
            } else {
                print_json(&value)?;
            }
        } else {
            if clear {
                out!("\x1b[2J\x1b[H");
            }
            out!("{}", render_status(&report, describe, colors()));
        }
        if !watch {
            return Ok(if report.needs_attention() {
                NOT_SETTLED
            } else {
                OK
            });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The report as `status --json` prints it (and the console serves it).
pub(crate) fn status_json(report: &Report, describe: &str) -> Value {
    let mut value =
        serde_json::to_value(report).unwrap_or_else(|e| json!({"error": e.to_string()}));
    value["store"] = json!(describe);
    value["needs_attention"] = json!(report.needs_attention());
    value["settled"] = json!(report.is_settled());
    value
}

fn render_status(report: &Report, describe: &str, color: bool) -> String {
    let mut out = format!(
        "{describe}: head {} at {}\n\n",
        report.head.0,
        time(report.taken_at)
    );
    let mut table = Table::new(&["SUBSCRIBER", "STATE", "POSITION", "LAG", "AGE", "LEASE"]);
    for sub in &report.subscribers {
        let mut lag = sub.lag_events.to_string();
        if sub.lag_capped {
            lag.push('+');
        }
        if sub.name.contains('#') && sub.lag_events > 0 {
            lag = format!("≤ {lag}");
        }
        let age = if sub.lag_events == 0 {
            "-".to_owned()
        } else {
            seconds(sub.lag_seconds)
        };
        let lease = match &sub.lease {
            None => "-".to_owned(),
            Some(l) if sub.lease_active => format!(
                "{} ({}) until {}",
                cut(&l.owner, 24),
                cut(&l.instance, 8),
                l.expires_at.format("%H:%M:%S")
            ),
            Some(l) if l.expires_at.timestamp() <= 0 => {
                format!("released by {}", cut(&l.owner, 24))
            }
            Some(l) => format!("expired ({}) at {}", cut(&l.owner, 24), time(l.expires_at)),
        };
        let state = if sub.held > 0 {
            format!("held ({})", sub.held)
        } else {
            sub.state.as_str().to_owned()
        };
        // Red: waits for an operator; yellow: behind; green: at the head.
        let code = match sub.state {
            SubscriberState::Held | SubscriberState::Stopped => "31",
            SubscriberState::CatchingUp | SubscriberState::Behind => "33",
            SubscriberState::Live | SubscriberState::AtHead => "32",
        };
        let state = paint(&state, if sub.held > 0 { "31" } else { code }, color);
        table.row(vec![
            sub.name.clone(),
            state,
            sub.position.0.to_string(),
            lag,
            age,
            lease,
        ]);
    }
    if table.is_empty() {
        out.push_str("no subscribers have saved a checkpoint in this store\n");
    } else {
        out.push_str(&table.render());
    }
    out.push('\n');
    if !report.groups.is_empty() {
        out.push_str(&render_groups(&report.groups));
        out.push('\n');
    }
    out.push_str(&report.summary());
    out.push('\n');
    if report.needs_attention() {
        out.push_str(&paint(
            "NOT SETTLED: something waits for an operator (see `aftermath dead-letters`)",
            "1;31",
            color,
        ));
        out.push('\n');
    } else if report.is_settled() {
        out.push_str(&paint(
            "settled: every subscriber is at the head, nothing is parked",
            "32",
            color,
        ));
        out.push('\n');
    } else {
        out.push_str("nothing is parked; some subscribers are behind the head\n");
    }
    out
}

/// Consumer groups: each live member and the partitions it holds.
fn render_groups(groups: &[admin::GroupStatus]) -> String {
    let mut table = Table::new(&["GROUP", "MEMBER", "PARTITIONS", "JOINED"]);
    for group in groups {
        for member in &group.members {
            table.row(vec![
                group.group.clone(),
                format!("{} ({})", cut(&member.owner, 24), cut(&member.instance, 8)),
                format!(
                    "{} ({})",
                    ranges(&member.partitions),
                    member.partitions.len()
                ),
                member.joined_at.format("%H:%M:%S").to_string(),
            ]);
        }
        if !group.unheld.is_empty() {
            table.row(vec![
                group.group.clone(),
                "(no holder)".to_owned(),
                format!("{} ({})", ranges(&group.unheld), group.unheld.len()),
                "-".to_owned(),
            ]);
        }
    }
    table.render()
}

/// `0-3,7,9-10`: sorted partition indexes as ranges.
fn ranges(indexes: &[u32]) -> String {
    if indexes.is_empty() {
        return "-".to_owned();
    }
    let mut parts: Vec<String> = Vec::new();
    let mut start = indexes[0];
    let mut last = start;
    for &i in &indexes[1..] {
        if i == last + 1 {
            last = i;
            continue;
        }
        parts.push(range_text(start, last));
        (start, last) = (i, i);
    }
    parts.push(range_text(start, last));
    parts.join(",")
}

fn range_text(first: u32, last: u32) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

// ---------------------------------------------------------- dead letters

async fn dead_letters<S: Admin>(s: &S, reactor: Option<&str>, json: bool) -> Result<u8, Failure> {
    let report = admin::settled(s).await?;
    let effects: Vec<_> = report
        .held_effects
        .iter()
        .filter(|e| reactor.is_none_or(|r| e.reactor == r))
        .collect();
    if let Some(r) = reactor {
        known_reactor(s, r).await?;
    }
    if json {
        print_json(&dead_letters_json(&report, reactor))?;
        return Ok(OK);
    }
    let mut out = String::new();
    out.push_str(&format!("effects parked or blocked: {}\n", effects.len()));
    for e in &effects {
        out.push_str(&format!(
            "  {}  {}  {} @{}  {}  {} after {} attempt(s), {}\n",
            e.reactor,
            e.event_id,
            e.stream,
            e.position.0,
            e.event_type,
            e.state,
            e.attempts,
            time(e.updated_at)
        ));
        if let Some(error) = &e.last_error {
            out.push_str(&format!("      error: {}\n", cut(error, 200)));
        }
    }
    out.push_str(&format!(
        "parked process instances: {}\n",
        report.parked_processes.len()
    ));
    for p in &report.parked_processes {
        out.push_str(&format!(
            "  {}  parked at version {}, {}\n      error: {}\n",
            p.stream,
            p.parked_version,
            time(p.parked_at),
            cut(&p.error, 200)
        ));
    }
    out.push_str(&format!(
        "skipped projection events: {}\n",
        report.skipped.len()
    ));
    for k in &report.skipped {
        out.push_str(&format!(
            "  {}  {} v{} @{}  {}, {}\n      error: {}\n",
            k.subscriber,
            k.stream,
            k.version,
            k.position.0,
            k.event_type,
            time(k.skipped_at),
            cut(&k.error, 200)
        ));
    }
    out.push_str(&format!(
        "parked inbox messages: {}\n",
        report.parked_messages.len()
    ));
    for m in &report.parked_messages {
        out.push_str(&format!(
            "  {}  {} on {}, {}\n      error: {}\n",
            m.inbox,
            m.message_id,
            m.subject,
            time(m.parked_at),
            cut(&m.error, 200)
        ));
    }
    if !effects.is_empty() {
        out.push_str(
            "\nretry: aftermath retry REACTOR EVENT_ID (or --all); give up: aftermath skip REACTOR EVENT_ID\n",
        );
    }
    out!("{out}");
    Ok(OK)
}

/// The dead letters as `dead-letters --json` prints them (and the console
/// serves them): of every reactor, or of `reactor`.
pub(crate) fn dead_letters_json(report: &Report, reactor: Option<&str>) -> Value {
    let effects: Vec<_> = report
        .held_effects
        .iter()
        .filter(|e| reactor.is_none_or(|r| e.reactor == r))
        .collect();
    json!({
        "effects": effects,
        "parked_processes": report.parked_processes,
        "skipped": report.skipped,
        "parked_messages": report.parked_messages,
    })
}

/// Fails unless `reactor` has a checkpoint or journal entries in the store.
async fn known_reactor<S: Admin>(s: &S, reactor: &str) -> Result<(), Failure> {
    let mut known: BTreeSet<String> = s
        .checkpoints()
        .await?
        .iter()
        .map(|c| admin::base_name(&c.name).to_owned())
        .collect();
    known.extend(s.parked(None).await?.into_iter().map(|e| e.reactor));
    if known.contains(reactor) {
        return Ok(());
    }
    let names: Vec<_> = known.into_iter().collect();
    Err(Failure::error(format!(
        "unknown reactor `{reactor}`: no subscriber of that name in this store (known: {})",
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    )))
}

fn confirm(question: &str, yes: bool) -> Result<(), Failure> {
    if yes || !std::io::stdin().is_terminal() {
        return Ok(());
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::error(format!("cannot read the answer: {e}")))?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Failure::error("not confirmed: nothing changed"))
    }
}

async fn release<S: Admin>(
    s: &S,
    reactor: &str,
    event_id: Option<Uuid>,
    all: bool,
    yes: bool,
    skip: bool,
    json: bool,
) -> Result<u8, Failure> {
    known_reactor(s, reactor).await?;
    let parked = s.parked(Some(reactor)).await?;
    let verb = if skip { "skip" } else { "retry" };
    if all {
        if parked.is_empty() {
            if json {
                print_json(&json!({"reactor": reactor, "retried": 0}))?;
            } else {
                outln!("{reactor}: no parked effects");
            }
            return Ok(OK);
        }
        confirm(
            &format!("Retry {} parked effect(s) of {reactor}?", parked.len()),
            yes,
        )?;
        let n = s.retry_all(reactor).await?;
        if json {
            print_json(&json!({"reactor": reactor, "retried": n}))?;
        } else {
            outln!("{reactor}: {n} parked effect(s) will run again on the reactor's next pass");
        }
        return Ok(OK);
    }
    let Some(event_id) = event_id else {
        return Err(Failure::usage("give an EVENT_ID or --all"));
    };
    let Some(effect) = parked.iter().find(|e| e.event_id == event_id) else {
        return Err(Failure::error(format!(
            "no parked effect of reactor `{reactor}` for event {event_id} (see `aftermath dead-letters`)"
        )));
    };
    confirm(
        &format!(
            "{} the effect of {reactor} for {} {} ({} @{}: {})?",
            if skip { "Skip" } else { "Retry" },
            effect.event_type,
            event_id,
            effect.stream,
            effect.position.0,
            cut(
                effect.last_error.as_deref().unwrap_or("no error recorded"),
                80
            )
        ),
        yes,
    )?;
    let done = if skip {
        s.skip(reactor, event_id).await?
    } else {
        s.retry(reactor, event_id).await?
    };
    if !done {
        return Err(Failure::error(format!(
            "the effect of `{reactor}` for event {event_id} is no longer parked: nothing to {verb}"
        )));
    }
    if json {
        print_json(&json!({"reactor": reactor, "event_id": event_id, "action": verb}))?;
    } else if skip {
        outln!("{reactor}: skipped the effect for {event_id}; it will not run, its stream goes on");
    } else {
        outln!("{reactor}: the effect for {event_id} will run again on the reactor's next pass");
    }
    Ok(OK)
}

async fn release_process<S: Admin>(
    s: &S,
    stream: &str,
    yes: bool,
    skip: bool,
    json: bool,
) -> Result<u8, Failure> {
    let parked = aftermath::admin::parked_processes(s).await?;
    let Some(p) = parked.iter().find(|p| p.stream == stream) else {
        return Err(Failure::error(format!(
            "no parked process instance with stream `{stream}` (see `aftermath dead-letters`)"
        )));
    };
    confirm(
        &format!(
            "{} the parked process instance {stream} (parked at v{}: {})?",
            if skip {
                "Skip the parked input of"
            } else {
                "Retry"
            },
            p.parked_version,
            cut(&p.error, 80)
        ),
        yes,
    )?;
    if !aftermath::admin::release_process(s, stream, skip).await? {
        return Err(Failure::error(format!(
            "process instance `{stream}` is no longer parked: nothing to release"
        )));
    }
    let verb = if skip { "skip" } else { "retry" };
    if json {
        print_json(&json!({"stream": stream, "action": verb}))?;
    } else if skip {
        outln!(
            "{stream}: released; its parked input is dropped and the inputs held behind it run on the runner's next pass"
        );
    } else {
        outln!("{stream}: released; its parked input runs again on the runner's next pass");
    }
    Ok(OK)
}

// -------------------------------------------------------------- timeline

fn payload_value(payload: &[u8]) -> Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
}

fn event_json(e: &StoredEvent) -> Value {
    json!({
        "position": e.position,
        "stream": e.stream,
        "version": e.version,
        "id": e.id,
        "event_type": e.event_type,
        "recorded_at": time(e.recorded_at),
        "correlation_id": e.metadata.correlation_id,
        "causation_id": e.metadata.causation_id,
        "traceparent": e.metadata.trace.as_ref().map(|t| t.traceparent()),
        "tracestate": e.metadata.trace.as_ref().and_then(|t| t.tracestate()),
        "extra": e.metadata.extra,
        "payload": payload_value(&e.payload),
    })
}

/// The correlation id given, or that of the first event of `stream`, or
/// that of `event`.
pub(crate) async fn conversation<S: Admin>(
    s: &S,
    correlation_id: Option<Uuid>,
    stream: Option<&str>,
    event: Option<Uuid>,
) -> Result<Uuid, Failure> {
    if let Some(id) = correlation_id {
        return Ok(id);
    }
    if let Some(name) = stream {
        let first = s.read_stream(name, 1, Direction::Forward, 1).await?;
        return first
            .first()
            .map(|e| e.metadata.correlation_id)
            .ok_or_else(|| Failure::error(format!("no stream `{name}` in this store")));
    }
    if let Some(id) = event {
        return s
            .find_event(id)
            .await?
            .map(|e| e.metadata.correlation_id)
            .ok_or_else(|| Failure::error(format!("no event {id} in this store")));
    }
    Err(Failure::usage(
        "give a CORRELATION_ID, --stream NAME or --event EVENT_ID",
    ))
}

async fn show_timeline<S: Admin>(
    s: &S,
    correlation_id: Uuid,
    json: bool,
    mermaid: bool,
) -> Result<u8, Failure> {
    let t = timeline(s, s, correlation_id).await?;
    if t.entries.is_empty() {
        return Err(Failure::error(format!(
            "no events with correlation id {correlation_id} in this store"
        )));
    }
    if json {
        let entries: Vec<Value> = t
            .entries
            .iter()
            .map(|entry| match entry {
                TimelineEntry::Event {
                    event,
                    depth,
                    caused_by,
                    ..
                } => {
                    let mut v = event_json(event);
                    v["kind"] = json!("event");
                    v["depth"] = json!(depth);
                    v["caused_by"] = json!(caused_by);
                    v
                }
                TimelineEntry::Effect { effect, depth } => json!({
                    "kind": "effect",
                    "depth": depth,
                    "reactor": effect.reactor,
                    "event_id": effect.event_id,
                    "state": effect.state.as_str(),
                    "attempts": effect.attempts,
                    "last_error": effect.last_error,
                    "updated_at": time(effect.updated_at),
                }),
            })
            .collect();
        print_json(&json!({"correlation_id": correlation_id, "entries": entries}))?;
    } else if mermaid {
        out!("{}", render_mermaid(&t.entries));
    } else {
        out!("{t}");
    }
    Ok(OK)
}

/// Text safe inside a Mermaid message or note.
fn mermaid_text(text: &str) -> String {
    cut(text, 80).replace([';', '#'], " ").replace('\n', " ")
}

fn render_mermaid(entries: &[TimelineEntry]) -> String {
    let mut lanes: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<(String, String)> = Vec::new();
    let mut lane = |name: String, order: &mut Vec<(String, String)>| -> String {
        let next = format!("p{}", lanes.len());
        lanes
            .entry(name.clone())
            .or_insert_with(|| {
                order.push((next.clone(), name));
                next
            })
            .clone()
    };
    let mut stream_of_position = BTreeMap::new();
    let mut body = Vec::new();
    let mut current = String::new();
    for entry in entries {
        match entry {
            TimelineEntry::Event {
                event,
                caused_by,
                record,
                ..
            } => {
                let to = lane(event.stream.clone(), &mut order);
                stream_of_position.insert(event.position, to.clone());
                current = to.clone();
                let text = match record {
                    Some(r) => {
                        let line = describe_record(event, r);
                        match line.strip_prefix(&format!("{} ", event.stream)) {
                            Some(rest) => rest.to_owned(),
                            None => line,
                        }
                    }
                    None => event.event_type.clone(),
                };
                let label = mermaid_text(&format!("{text} (v{})", event.version));
                match caused_by.and_then(|p| stream_of_position.get(&p)) {
                    Some(from) => body.push(format!("    {from}->>{to}: {label}")),
                    None => body.push(format!("    Note over {to}: {label}")),
                }
            }
            TimelineEntry::Effect { effect, .. } => {
                let to = lane(format!("reactor {}", effect.reactor), &mut order);
                let arrow = if effect.state.as_str() == "done" {
                    "-->>"
                } else {
                    "--x"
                };
                let mut label = format!(
                    "effect {} after {} attempt(s)",
                    effect.state.as_str(),
                    effect.attempts
                );
                if let Some(e) = &effect.last_error
                    && effect.state.as_str() != "done"
                {
                    label.push_str(": ");
                    label.push_str(e);
                }
                body.push(format!(
                    "    {current}{arrow}{to}: {}",
                    mermaid_text(&label)
                ));
            }
        }
    }
    let mut out = String::from("sequenceDiagram\n");
    for (id, name) in &order {
        out.push_str(&format!("    participant {id} as {}\n", mermaid_text(name)));
    }
    for line in body {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

// ------------------------------------------------------------------ tail

/// The stream's category: what comes before its first `-`.
fn in_categories(stream: &str, categories: &[String]) -> bool {
    categories.is_empty()
        || categories.iter().any(|c| {
            stream.len() > c.len()
                && stream.starts_with(c.as_str())
                && stream[c.len()..].starts_with('-')
        })
}

async fn tail<S: Admin>(
    s: &S,
    types: &[String],
    categories: &[String],
    from: Option<u64>,
    json: bool,
) -> Result<u8, Failure> {
    const PAGE: usize = 500;
    let mut after = match from {
        Some(p) => Position(p),
        None => s.head().await?,
    };
    let type_names: Vec<&str> = types.iter().map(String::as_str).collect();
    let filter = (!type_names.is_empty()).then_some(type_names.as_slice());
    eprintln!("following $all after position {} (Ctrl-C stops)", after.0);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let page = s.read_all(after, filter, PAGE).await?;
        if let Some(last) = page.last() {
            after = last.position;
        }
        let mut text = String::new();
        for e in page.iter().filter(|e| in_categories(&e.stream, categories)) {
            if json {
                text.push_str(&event_json(e).to_string());
            } else {
                text.push_str(&format!(
                    "@{}  {}  {} v{}  {}  id {}  correlation {}",
                    e.position.0,
                    time(e.recorded_at),
                    e.stream,
                    e.version,
                    e.event_type,
                    e.id,
                    e.metadata.correlation_id
                ));
            }
            text.push('\n');
        }
        if !text.is_empty() {
            out!("{text}");
        }
        if page.len() < PAGE {
            tokio::select! {
                _ = &mut stop => return Ok(OK),
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}

// --------------------------------------------------------------- streams

async fn streams<S: Admin>(
    s: &S,
    category: Option<&str>,
    limit: usize,
    json: bool,
) -> Result<u8, Failure> {
    let found = s.streams(category, limit).await?;
    if json {
        print_json(&found)?;
        return Ok(OK);
    }
    if found.is_empty() {
        match category {
            Some(c) => outln!("no streams of category `{c}`"),
            None => outln!("no streams: the store holds no events"),
        }
        return Ok(OK);
    }
    let mut table = Table::new(&["STREAM", "VERSION", "EVENTS", "LAST WRITE"]);
    for st in &found {
        table.row(vec![
            cut(&st.stream, 50),
            st.version.to_string(),
            st.events.to_string(),
            time(st.last_write),
        ]);
    }
    out!("{}", table.render());
    if found.len() == limit {
        outln!("(first {limit} streams; more with --limit)");
    }
    Ok(OK)
}

async fn stream<S: Admin>(
    s: &S,
    name: &str,
    from: u64,
    limit: usize,
    json: bool,
) -> Result<u8, Failure> {
    let events = s
        .read_stream(name, from.max(1), Direction::Forward, limit)
        .await?;
    if events.is_empty() {
        let version = s.stream_version(name).await?;
        if version == 0 {
            return Err(Failure::error(format!("no stream `{name}` in this store")));
        }
        if !json {
            outln!("{name}: version {version}, no events from version {from}");
            return Ok(OK);
        }
    }
    if json {
        let list: Vec<Value> = events.iter().map(event_json).collect();
        print_json(&json!({"stream": name, "events": list}))?;
        return Ok(OK);
    }
    for e in &events {
        outln!(
            "v{}  @{}  {}  {}  id {}",
            e.version,
            e.position.0,
            time(e.recorded_at),
            e.event_type,
            e.id
        );
        outln!(
            "    correlation {}  causation {}",
            e.metadata.correlation_id,
            e.metadata.causation_id
        );
        if let Some(trace) = &e.metadata.trace {
            match trace.tracestate() {
                Some(state) => outln!("    trace {trace}  state {}", cut(state, 80)),
                None => outln!("    trace {trace}"),
            }
        }
        for (k, v) in &e.metadata.extra {
            outln!("    {k}: {}", cut(v, 80));
        }
        outln!("    {}", cut(&String::from_utf8_lossy(&e.payload), 200));
    }
    if events.len() == limit {
        let next = events.last().map_or(from, |e| e.version + 1);
        outln!("(more from --from {next})");
    }
    Ok(OK)
}

// ------------------------------------------------------------- processes

async fn processes<S: Admin>(
    s: &S,
    process: Option<&str>,
    state: Option<&str>,
    limit: usize,
    json: bool,
) -> Result<u8, Failure> {
    let found: Vec<_> = admin::processes(s, process, usize::MAX)
        .await?
        .into_iter()
        .filter(|p| state.is_none_or(|st| p.state.as_str() == st))
        .take(limit)
        .collect();
    if json {
        print_json(&found)?;
        return Ok(OK);
    }
    if found.is_empty() {
        outln!(
            "no process instances{}",
            match (process, state) {
                (Some(p), _) => format!(" of `{p}`"),
                _ => String::new(),
            }
        );
        return Ok(OK);
    }
    let mut table = Table::new(&["PROCESS", "INSTANCE", "STATE", "VERSION", "LAST WRITE"]);
    for p in &found {
        table.row(vec![
            cut(&p.process, 24),
            cut(&p.instance, 30),
            p.state.as_str().to_owned(),
            p.version.to_string(),
            time(p.last_write),
        ]);
    }
    out!("{}", table.render());
    Ok(OK)
}

// ------------------------------------------------------------- deadlines

async fn deadlines<S: Admin>(s: &S, limit: usize, json: bool) -> Result<u8, Failure> {
    let found = s.deadlines(limit).await?;
    if json {
        let list: Vec<Value> = found
            .iter()
            .map(|d| {
                json!({
                    "process": d.process,
                    "instance": d.instance,
                    "id": d.id,
                    "name": d.name,
                    "due_at": time(d.due_at),
                })
            })
            .collect();
        print_json(&list)?;
        return Ok(OK);
    }
    if found.is_empty() {
        outln!("no pending deadlines");
        return Ok(OK);
    }
    let now = Utc::now();
    let mut table = Table::new(&["PROCESS", "INSTANCE", "DEADLINE", "DUE", "IN"]);
    for d in &found {
        let left = (d.due_at - now).num_milliseconds() as f64 / 1000.0;
        table.row(vec![
            cut(&d.process, 24),
            cut(&d.instance, 24),
            cut(&d.name, 20),
            time(d.due_at),
            if left < 0.0 {
                format!("overdue {}", seconds(-left))
            } else {
                seconds(left)
            },
        ]);
    }
    out!("{}", table.render());
    if found.len() == limit {
        outln!("(first {limit} deadlines; more with --limit)");
    }
    Ok(OK)
}

// ----------------------------------------------------------------- check

fn check(describe: &str, versions: Versions, json: bool) -> Result<u8, Failure> {
    if json {
        print_json(&json!({
            "store": describe,
            "ok": true,
            "schema_version": versions.found,
            "supported_version": versions.build,
        }))?;
    } else {
        outln!(
            "{describe}: ok, an aftermath store at schema version {} (this build: {})",
            versions.found,
            versions.build
        );
    }
    Ok(OK)
}

fn migrated(describe: &str, versions: Versions, json: bool) -> Result<u8, Failure> {
    if json {
        print_json(&json!({
            "store": describe,
            "from_version": versions.found,
            "to_version": versions.build,
        }))?;
    } else if versions.found == versions.build {
        outln!("{describe}: already at schema version {}", versions.build);
    } else {
        outln!(
            "{describe}: migrated from schema version {} to {}",
            versions.found,
            versions.build
        );
    }
    Ok(OK)
}
