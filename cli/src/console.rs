//! `aftermath console`: a small web UI over the same library calls as the
//! commands (status, dead letters, retry/skip, timeline). Pages are
//! rendered here; the stylesheet and the script are embedded in the binary.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use aftermath::admin;
use aftermath::process::record::InputRecord;
use aftermath::process::{ProcessRecord, TimelineEntry, describe_record, timeline};
use aftermath::reactor::EffectJournal;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::commands::{conversation, dead_letters_json, status_json};
use crate::store::Store;
use crate::table::cut;
use crate::{Failure, OK, with_store};

const CSS: &str = include_str!("console/console.css");
const JS: &str = include_str!("console/console.js");

#[derive(Clone)]
struct App {
    store: Arc<Store>,
    describe: Arc<str>,
    token: Arc<str>,
}

/// Serves the console on `bind:port` until Ctrl-C.
pub async fn serve(
    store: Store,
    describe: String,
    bind: IpAddr,
    port: u16,
    token: Option<String>,
) -> Result<u8, Failure> {
    let token = match token {
        Some(t) if t.trim().is_empty() => {
            return Err(Failure::usage("--token is empty: give a non-empty token"));
        }
        Some(t) => t,
        None if !bind.is_loopback() => {
            return Err(Failure::usage(format!(
                "--bind {bind} is not a loopback address: anyone who reaches it could retry and skip effects, so give the token explicitly (--token or AFTERMATH_CONSOLE_TOKEN)"
            )));
        }
        None => Uuid::new_v4().simple().to_string(),
    };
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(bind, port))
        .await
        .map_err(|e| Failure::error(format!("cannot listen on {bind}:{port}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::error(format!("cannot read the bound address: {e}")))?;
    let app = App {
        store: Arc::new(store),
        describe: describe.clone().into(),
        token: token.clone().into(),
    };
    let router = Router::new()
        .route("/", get(status_page))
        .route("/dead-letters", get(dead_letters_page))
        .route("/timeline", get(timeline_page))
        .route("/api/status", get(status_api))
        .route("/api/dead-letters", get(dead_letters_api))
        .route("/api/retry", post(retry_api))
        .route("/api/skip", post(skip_api))
        .layer(axum::middleware::from_fn_with_state(
            bind.is_loopback(),
            only_local_hosts,
        ))
        .with_state(app);
    let host = match addr {
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        SocketAddr::V4(a) => a.to_string(),
    };
    // A server outlives its stdout: a closed one does not stop it.
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = write!(
            stdout,
            "aftermath console for {describe}\nlistening on http://{host}/\n\
             token for retry and skip: {token}\nopen http://{host}/?token={token}\nCtrl-C stops it\n"
        );
        let _ = stdout.flush();
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Failure::error(format!("the console stopped: {e}")))?;
    Ok(OK)
}

/// On a loopback address, refuses requests for any other host name: a web
/// page whose name an attacker re-points at 127.0.0.1 (DNS rebinding) must
/// not read the store through the visitor's browser.
async fn only_local_hosts(
    State(loopback): State<bool>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if loopback {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        let local = matches!(name, "localhost" | "[::1]")
            || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !local {
            return api_error(
                StatusCode::FORBIDDEN,
                format!(
                    "host `{host}` refused: the console answers to localhost and loopback addresses only"
                ),
            );
        }
    }
    next.run(request).await
}

// ------------------------------------------------------------ rendering

/// `text` escaped for HTML text and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` for a URL query value.
fn query_value(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn page(app: &App, title: &str, active: &str, body: &str) -> Html<String> {
    let nav = [
        ("/", "Status"),
        ("/dead-letters", "Dead letters"),
        ("/timeline", "Timelines"),
    ]
    .iter()
    .map(|(href, name)| {
        format!(
            "<a href=\"{href}\"{}>{name}</a>",
            if *href == active {
                " class=\"active\""
            } else {
                ""
            }
        )
    })
    .collect::<String>();
    Html(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · aftermath console</title><style>{CSS}</style></head>\
         <body><header><b>aftermath</b><nav>{nav}</nav><span class=\"store\">{}</span></header>\
         <main>{body}</main><script>{JS}</script></body></html>",
        esc(title),
        esc(&app.describe)
    ))
}

fn error_page(app: &App, status: StatusCode, active: &str, message: &str) -> Response {
    (
        status,
        page(
            app,
            "Error",
            active,
            &format!(
                "<h1>Error</h1><p class=\"error\" id=\"error\">{}</p>",
                esc(message)
            ),
        ),
    )
        .into_response()
}

fn api_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

// ---------------------------------------------------------------- status

async fn status_page(State(app): State<App>) -> Response {
    let body = "<h1>Status</h1>\
        <p class=\"muted\">Head of <code>$all</code>: <b id=\"head\">…</b> · refreshed <span id=\"taken\">…</span> \
        (every 1.5 s) <span id=\"poll-error\" class=\"error\"></span></p>\
        <div id=\"banner\" class=\"banner\">loading…</div>\
        <table><thead><tr><th>Subscriber</th><th>State</th><th>Position</th><th>Lag</th>\
        <th>Age</th><th>Lease</th></tr></thead><tbody id=\"subscribers\"></tbody></table>\
        <div id=\"groups\" hidden><h2>Consumer groups</h2>\
        <table><thead><tr><th>Group</th><th>Member</th><th>Partitions</th><th>Joined</th></tr></thead>\
        <tbody id=\"group-rows\"></tbody></table></div>\
        <p id=\"summary\" class=\"muted\"></p>";
    page(&app, "Status", "/", body).into_response()
}

async fn status_api(State(app): State<App>) -> Response {
    let report = with_store!(&*app.store, s => admin::settled(s).await);
    match report {
        Ok(report) => {
            let mut value = status_json(&report, &app.describe);
            value["summary"] = json!(report.summary());
            Json(value).into_response()
        }
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, Failure::from(e).message),
    }
}

// ---------------------------------------------------------- dead letters

async fn dead_letters_api(State(app): State<App>) -> Response {
    match with_store!(&*app.store, s => admin::settled(s).await) {
        Ok(report) => Json(dead_letters_json(&report, None)).into_response(),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, Failure::from(e).message),
    }
}

async fn dead_letters_page(State(app): State<App>) -> Response {
    let report = match with_store!(&*app.store, s => admin::settled(s).await) {
        Ok(r) => r,
        Err(e) => {
            return error_page(
                &app,
                StatusCode::INTERNAL_SERVER_ERROR,
                "/dead-letters",
                &Failure::from(e).message,
            );
        }
    };
    let mut b = String::from(
        "<h1>Dead letters</h1>\
         <div class=\"tokenbar\"><label for=\"token\">Token</label>\
         <input id=\"token\" type=\"password\" autocomplete=\"off\" placeholder=\"printed by aftermath console at start\">\
         <span class=\"muted\">needed to retry or skip</span></div><div id=\"message\"></div>",
    );
    let _ = write!(
        b,
        "<h2>Effects parked or blocked ({})</h2>",
        report.held_effects.len()
    );
    if report.held_effects.is_empty() {
        b.push_str("<p class=\"muted\" id=\"no-effects\">none</p>");
    } else {
        b.push_str(
            "<table id=\"effects\"><thead><tr><th>Reactor</th><th>Event</th><th>State</th>\
             <th>Attempts</th><th>Error</th><th></th></tr></thead><tbody>",
        );
        for e in &report.held_effects {
            let actions = if e.state == "blocked" {
                "<span class=\"muted\">waits for the parked effect before it</span>".to_owned()
            } else {
                let data = format!(
                    "data-reactor=\"{}\" data-event=\"{}\"",
                    esc(&e.reactor),
                    e.event_id
                );
                format!(
                    "<button class=\"retry\" data-action=\"retry\" {data}>Retry</button> \
                     <button class=\"skip\" data-action=\"skip\" {data}>Skip</button>"
                )
            };
            let _ = write!(
                b,
                "<tr data-event=\"{id}\" data-state=\"{state}\"><td class=\"mono\">{reactor}</td>\
                 <td><a href=\"/timeline?event={id}\">{etype}</a><br><span class=\"mono muted\">{stream} @{pos} · {id}</span></td>\
                 <td><span class=\"state {state}\">{state_text}</span></td><td class=\"num\">{attempts}</td>\
                 <td class=\"error\">{error}</td><td>{actions}</td></tr>",
                id = e.event_id,
                state = esc(&e.state),
                state_text = esc(&e.state.replace('_', " ")),
                reactor = esc(&e.reactor),
                etype = esc(&e.event_type),
                stream = esc(&e.stream),
                pos = e.position.0,
                attempts = e.attempts,
                error = esc(&cut(e.last_error.as_deref().unwrap_or(""), 300)),
            );
        }
        b.push_str("</tbody></table>");
    }
    let _ = write!(
        b,
        "<h2>Parked process instances ({})</h2>",
        report.parked_processes.len()
    );
    if report.parked_processes.is_empty() {
        b.push_str("<p class=\"muted\">none</p>");
    } else {
        b.push_str("<table><thead><tr><th>Instance</th><th>Parked at</th><th>Error</th></tr></thead><tbody>");
        for p in &report.parked_processes {
            let _ = write!(
                b,
                "<tr><td><a class=\"mono\" href=\"/timeline?stream={}\">{}</a></td><td>version {}, {}</td><td class=\"error\">{}</td></tr>",
                query_value(&p.stream),
                esc(&p.stream),
                p.parked_version,
                p.parked_at.format("%Y-%m-%d %H:%M:%S"),
                esc(&cut(&p.error, 300))
            );
        }
        b.push_str("</tbody></table><p class=\"muted\">Released from the application (<code>ProcessRunner::release</code>).</p>");
    }
    let _ = write!(
        b,
        "<h2>Skipped projection events ({})</h2>",
        report.skipped.len()
    );
    if report.skipped.is_empty() {
        b.push_str("<p class=\"muted\">none</p>");
    } else {
        b.push_str(
            "<table><thead><tr><th>Projection</th><th>Event</th><th>Error</th></tr></thead><tbody>",
        );
        for k in &report.skipped {
            let _ = write!(
                b,
                "<tr><td class=\"mono\">{}</td><td>{} <span class=\"mono muted\">{} v{} @{}</span></td><td class=\"error\">{}</td></tr>",
                esc(&k.subscriber),
                esc(&k.event_type),
                esc(&k.stream),
                k.version,
                k.position.0,
                esc(&cut(&k.error, 300))
            );
        }
        b.push_str("</tbody></table>");
    }
    let _ = write!(
        b,
        "<h2>Parked inbox messages ({})</h2>",
        report.parked_messages.len()
    );
    if report.parked_messages.is_empty() {
        b.push_str("<p class=\"muted\">none</p>");
    } else {
        b.push_str(
            "<table><thead><tr><th>Inbox</th><th>Message</th><th>Error</th></tr></thead><tbody>",
        );
        for m in &report.parked_messages {
            let _ = write!(
                b,
                "<tr><td class=\"mono\">{}</td><td>{} <span class=\"mono muted\">on {}</span></td><td class=\"error\">{}</td></tr>",
                esc(&m.inbox),
                esc(&m.message_id),
                esc(&m.subject),
                esc(&cut(&m.error, 300))
            );
        }
        b.push_str("</tbody></table>");
    }
    page(&app, "Dead letters", "/dead-letters", &b).into_response()
}

#[derive(Deserialize)]
struct Release {
    reactor: String,
    event_id: Uuid,
}

/// The refusal of a request without the token (`None`: it has it).
fn refusal(app: &App, headers: &HeaderMap) -> Option<Response> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Some(api_error(
            StatusCode::UNAUTHORIZED,
            "retry and skip need the token printed by `aftermath console` (Authorization: Bearer TOKEN)",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if given.is_empty() {
        return Some(api_error(
            StatusCode::UNAUTHORIZED,
            "retry and skip need the token printed by `aftermath console`",
        ));
    }
    // Compared in time independent of where they differ.
    let expected = app.token.as_bytes();
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        None
    } else {
        Some(api_error(StatusCode::FORBIDDEN, "wrong token"))
    }
}

async fn release(app: App, headers: HeaderMap, body: &[u8], skip: bool) -> Response {
    // The token first: nothing about the request is answered without it.
    if let Some(refused) = refusal(&app, &headers) {
        return refused;
    }
    let Release { reactor, event_id } = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"reactor\": NAME, \"event_id\": UUID}}: {e}"),
            );
        }
    };
    let done = with_store!(&*app.store, s => {
        if skip { s.skip(&reactor, event_id).await } else { s.retry(&reactor, event_id).await }
    });
    match done {
        Ok(true) => {
            let message = if skip {
                format!(
                    "{reactor}: skipped the effect for {event_id}; it will not run, its stream goes on"
                )
            } else {
                format!(
                    "{reactor}: the effect for {event_id} will run again on the reactor's next pass"
                )
            };
            Json(json!({
                "reactor": reactor,
                "event_id": event_id,
                "action": if skip { "skip" } else { "retry" },
                "message": message,
            }))
            .into_response()
        }
        Ok(false) => api_error(
            StatusCode::CONFLICT,
            format!(
                "no parked effect of reactor `{reactor}` for event {event_id}: nothing to {}",
                if skip { "skip" } else { "retry" }
            ),
        ),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, Failure::from(e).message),
    }
}

async fn retry_api(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    release(app, headers, &body, false).await
}

async fn skip_api(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    release(app, headers, &body, true).await
}

// -------------------------------------------------------------- timeline

#[derive(Deserialize)]
struct TimelineQuery {
    id: Option<String>,
    stream: Option<String>,
    event: Option<String>,
}

fn parse_uuid(text: Option<&str>, what: &str) -> Result<Option<Uuid>, Failure> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => Uuid::parse_str(t)
            .map(Some)
            .map_err(|_| Failure::usage(format!("`{t}` is not a valid {what} (a UUID)"))),
    }
}

async fn timeline_page(State(app): State<App>, Query(q): Query<TimelineQuery>) -> Response {
    let stream = q.stream.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let ids = parse_uuid(q.id.as_deref(), "correlation id")
        .and_then(|id| Ok((id, parse_uuid(q.event.as_deref(), "event id")?)));
    let (id, event) = match ids {
        Ok(ids) => ids,
        Err(f) => return error_page(&app, StatusCode::BAD_REQUEST, "/timeline", &f.message),
    };
    let form = format!(
        "<form method=\"get\" action=\"/timeline\" class=\"tokenbar\">\
         <input type=\"text\" name=\"id\" placeholder=\"correlation id\" value=\"{}\">\
         <span class=\"muted\">or</span>\
         <input type=\"text\" name=\"stream\" placeholder=\"stream (order-o-1, a process instance…)\" value=\"{}\">\
         <button type=\"submit\">Show</button></form>",
        id.map(|i| i.to_string()).unwrap_or_default(),
        esc(stream.unwrap_or(""))
    );
    if id.is_none() && stream.is_none() && event.is_none() {
        return timeline_index(&app, &form).await;
    }
    let drawn = with_store!(&*app.store, s => async {
        let id = conversation(s, id, stream, event).await?;
        let t = timeline(s, s, id).await?;
        if t.entries.is_empty() {
            return Err(Failure::error(format!(
                "no events with correlation id {id} in this store"
            )));
        }
        Ok((id, t))
    }.await);
    match drawn {
        Ok((id, t)) => {
            let body = format!(
                "<h1>Timeline <span class=\"mono\">{id}</span></h1>{form}\
                 <p class=\"muted\">{} events and effects under this correlation id. Lanes: streams, \
                 process instances and reactors; time runs down.</p>{}{}",
                t.entries.len(),
                LEGEND,
                sequence_svg(&t.entries)
            );
            page(&app, &format!("Timeline {id}"), "/timeline", &body).into_response()
        }
        Err(f) => error_page(&app, StatusCode::NOT_FOUND, "/timeline", &f.message),
    }
}

async fn timeline_index(app: &App, form: &str) -> Response {
    let found = with_store!(&*app.store, s => admin::processes(s, None, 200).await);
    let mut b = format!("<h1>Timelines</h1>{form}<h2>Process instances</h2>");
    match found {
        Ok(list) if list.is_empty() => b.push_str("<p class=\"muted\">no process instances</p>"),
        Ok(list) => {
            b.push_str(
                "<table id=\"processes\"><thead><tr><th>Process</th><th>Instance</th><th>State</th>\
                 <th>Version</th><th>Last write</th></tr></thead><tbody>",
            );
            for p in &list {
                let state = p.state.as_str();
                let _ = write!(
                    b,
                    "<tr><td class=\"mono\">{}</td><td><a class=\"mono\" href=\"/timeline?stream={}\">{}</a></td>\
                     <td><span class=\"state {}\">{}</span></td><td class=\"num\">{}</td><td>{}</td></tr>",
                    esc(&p.process),
                    query_value(&p.stream),
                    esc(&p.instance),
                    if state == "completed" {
                        "done"
                    } else if state == "parked" {
                        "parked"
                    } else {
                        "live"
                    },
                    esc(state),
                    p.version,
                    p.last_write.format("%Y-%m-%d %H:%M:%S")
                );
            }
            b.push_str("</tbody></table>");
        }
        Err(e) => {
            let _ = write!(
                b,
                "<p class=\"error\">{}</p>",
                esc(&Failure::from(e).message)
            );
        }
    }
    page(app, "Timelines", "/timeline", &b).into_response()
}

/// What an arrow or a note of the diagram is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Event,
    Command,
    Compensation,
    Rejection,
    Deadline,
    Effect,
    FailedEffect,
    Note,
    Parked,
}

impl Kind {
    fn class(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Command => "command",
            Kind::Compensation => "compensation",
            Kind::Rejection => "rejection",
            Kind::Deadline => "deadline",
            Kind::Effect => "effect",
            Kind::FailedEffect => "effect-failed",
            Kind::Note => "note",
            Kind::Parked => "parked",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Kind::Event => "#475467",
            Kind::Command => "#1f5fbf",
            Kind::Compensation => "#c4320a",
            Kind::Rejection => "#b42318",
            Kind::Deadline => "#6941c6",
            Kind::Effect => "#157f3b",
            Kind::FailedEffect => "#b42318",
            Kind::Note => "#667085",
            Kind::Parked => "#b42318",
        }
    }

    fn dashed(self) -> bool {
        matches!(self, Kind::Rejection | Kind::Effect | Kind::FailedEffect)
    }
}

const LEGEND: &str = "<p class=\"legend\">\
    <span><i style=\"background:#475467\"></i>event</span>\
    <span><i style=\"background:#1f5fbf\"></i>command</span>\
    <span><i style=\"background:#c4320a\"></i>compensation</span>\
    <span><i style=\"background:#b42318\"></i>rejection / failure</span>\
    <span><i style=\"background:#6941c6\"></i>deadline</span>\
    <span><i style=\"background:#157f3b\"></i>effect done</span></p>";

/// One row of the diagram: an arrow from lane `from` to lane `to`, or a
/// note on lane `to` when they are the same.
struct Row {
    from: usize,
    to: usize,
    kind: Kind,
    label: String,
    detail: String,
}

/// The name of a command (`{"Reserve": {..}}` → `Reserve`).
fn command_name(command: &serde_json::Value) -> String {
    match command {
        serde_json::Value::Object(map) if map.len() == 1 => {
            map.keys().next().cloned().unwrap_or_default()
        }
        serde_json::Value::Object(map) => map
            .get("type")
            .and_then(|t| t.as_str())
            .map_or_else(|| cut(&command.to_string(), 30), str::to_owned),
        serde_json::Value::String(s) => s.clone(),
        other => cut(&other.to_string(), 30),
    }
}

/// The rows and lanes of a sequence diagram of `entries`.
fn diagram(entries: &[TimelineEntry]) -> (Vec<String>, Vec<Row>) {
    use std::collections::HashMap;
    let mut lanes: Vec<String> = Vec::new();
    let lane = |name: &str, lanes: &mut Vec<String>| -> usize {
        match lanes.iter().position(|l| l == name) {
            Some(i) => i,
            None => {
                lanes.push(name.to_owned());
                lanes.len() - 1
            }
        }
    };
    let mut lane_of_position = HashMap::new();
    // Command records: their id (the command's) → the target's lane.
    let mut command_target: HashMap<Uuid, usize> = HashMap::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut current = 0;
    for entry in entries {
        match entry {
            TimelineEntry::Event {
                event,
                record,
                caused_by,
                ..
            } => {
                let here = lane(&event.stream, &mut lanes);
                lane_of_position.insert(event.position, here);
                current = here;
                let cause = caused_by.and_then(|p| lane_of_position.get(&p).copied());
                let detail = match record {
                    Some(r) => describe_record(event, r),
                    None => format!("{} {} (v{})", event.stream, event.event_type, event.version),
                };
                let row = match record {
                    Some(ProcessRecord::Received { input }) => match input {
                        InputRecord::Event {
                            event_type, stream, ..
                        } => Row {
                            from: lane(stream, &mut lanes),
                            to: here,
                            kind: Kind::Event,
                            label: event_type.clone(),
                            detail,
                        },
                        InputRecord::Rejected { rejection, .. } => Row {
                            from: lane(
                                &format!("{}-{}", rejection.command.target, rejection.command.id),
                                &mut lanes,
                            ),
                            to: here,
                            kind: Kind::Rejection,
                            label: format!(
                                "REJECTED {}: {}",
                                command_name(&rejection.command.command),
                                rejection.error
                            ),
                            detail,
                        },
                        InputRecord::Deadline { deadline, .. } => Row {
                            from: here,
                            to: here,
                            kind: Kind::Deadline,
                            label: format!("⏰ deadline `{}` fired", deadline.name),
                            detail,
                        },
                    },
                    Some(ProcessRecord::CommandSent {
                        command,
                        compensation,
                    }) => {
                        let target =
                            lane(&format!("{}-{}", command.target, command.id), &mut lanes);
                        command_target.insert(event.id, target);
                        Row {
                            from: here,
                            to: target,
                            kind: if *compensation {
                                Kind::Compensation
                            } else {
                                Kind::Command
                            },
                            label: format!(
                                "{}{}",
                                if *compensation { "COMPENSATION " } else { "" },
                                command_name(&command.command)
                            ),
                            detail,
                        }
                    }
                    Some(ProcessRecord::Compensating { steps }) => Row {
                        from: here,
                        to: here,
                        kind: Kind::Compensation,
                        label: format!("compensating {steps} step(s)"),
                        detail,
                    },
                    Some(ProcessRecord::DeadlineSet { name, due_at, .. }) => Row {
                        from: here,
                        to: here,
                        kind: Kind::Deadline,
                        label: format!(
                            "deadline `{name}` set, due {}",
                            due_at.format("%m-%d %H:%M")
                        ),
                        detail,
                    },
                    Some(ProcessRecord::DeadlineCancelled { name, .. }) => Row {
                        from: here,
                        to: here,
                        kind: Kind::Deadline,
                        label: format!("deadline `{name}` cancelled"),
                        detail,
                    },
                    Some(ProcessRecord::Parked { error, .. }) => Row {
                        from: here,
                        to: here,
                        kind: Kind::Parked,
                        label: format!("PARKED: {error}"),
                        detail,
                    },
                    Some(ProcessRecord::Completed {}) => Row {
                        from: here,
                        to: here,
                        kind: Kind::Note,
                        label: "completed".to_owned(),
                        detail,
                    },
                    Some(ProcessRecord::CompensationRegistered { command }) => Row {
                        from: here,
                        to: here,
                        kind: Kind::Note,
                        label: format!(
                            "undo registered: {} → {}-{}",
                            command_name(&command.command),
                            command.target,
                            command.id
                        ),
                        detail,
                    },
                    Some(_) => Row {
                        from: here,
                        to: here,
                        kind: Kind::Note,
                        label: detail
                            .strip_prefix(&format!("{} ", event.stream))
                            .unwrap_or(&detail)
                            .to_owned(),
                        detail,
                    },
                    None => {
                        // The event a command produced: the command's arrow
                        // already points at this lane.
                        let by_command =
                            command_target.get(&event.metadata.causation_id) == Some(&here);
                        let from = match cause {
                            Some(c) if !by_command => c,
                            _ => here,
                        };
                        Row {
                            from,
                            to: here,
                            kind: Kind::Event,
                            label: event.event_type.clone(),
                            detail,
                        }
                    }
                };
                rows.push(row);
            }
            TimelineEntry::Effect { effect, .. } => {
                let to = lane(&format!("reactor {}", effect.reactor), &mut lanes);
                let state = effect.state.as_str();
                let mut label = format!(
                    "effect {} ({} attempt(s))",
                    state.replace('_', " "),
                    effect.attempts
                );
                if state != "done"
                    && let Some(e) = &effect.last_error
                {
                    label.push_str(": ");
                    label.push_str(e);
                }
                rows.push(Row {
                    from: current,
                    to,
                    kind: if state == "done" {
                        Kind::Effect
                    } else {
                        Kind::FailedEffect
                    },
                    detail: label.clone(),
                    label,
                });
            }
        }
    }
    // Reactors to the right of the streams, each in order of appearance.
    let mut order: Vec<usize> = (0..lanes.len()).collect();
    order.sort_by_key(|&i| lanes[i].starts_with("reactor "));
    let mut new_index = vec![0; lanes.len()];
    for (new, &old) in order.iter().enumerate() {
        new_index[old] = new;
    }
    for row in &mut rows {
        row.from = new_index[row.from];
        row.to = new_index[row.to];
    }
    let lanes = order.into_iter().map(|i| lanes[i].clone()).collect();
    (lanes, rows)
}

/// A lane's title: `fulfillment.process-B-1` → `fulfillment B-1` (process).
fn lane_title(name: &str) -> String {
    match name.split_once(".process-") {
        Some((process, instance)) => format!("⚙ {process} {instance}"),
        None => name.to_owned(),
    }
}

/// The timeline as an inline SVG sequence diagram.
fn sequence_svg(entries: &[TimelineEntry]) -> String {
    const LANE: usize = 210;
    const LEFT: usize = 20;
    const TOP: usize = 56;
    const ROW: usize = 34;
    let (lanes, rows) = diagram(entries);
    let x = |i: usize| LEFT + LANE / 2 + i * LANE;
    let width = LEFT * 2 + lanes.len() * LANE;
    let height = TOP + rows.len() * ROW + 24;
    let mut s = format!(
        "<div class=\"diagram\"><svg id=\"sequence\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">"
    );
    s.push_str("<defs>");
    for kind in [
        Kind::Event,
        Kind::Command,
        Kind::Compensation,
        Kind::Rejection,
        Kind::Deadline,
        Kind::Effect,
        Kind::FailedEffect,
    ] {
        let _ = write!(
            s,
            "<marker id=\"head-{}\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"{}\"/></marker>",
            kind.class(),
            kind.color()
        );
    }
    s.push_str("</defs>");
    for (i, name) in lanes.iter().enumerate() {
        let cx = x(i);
        let is_reactor = name.starts_with("reactor ");
        let _ = write!(
            s,
            "<g class=\"lane\" data-lane=\"{}\"><title>{}</title><line x1=\"{cx}\" y1=\"{}\" x2=\"{cx}\" y2=\"{}\" stroke=\"#d0d5dd\" stroke-dasharray=\"4 4\"/>\
             <rect x=\"{}\" y=\"8\" width=\"{}\" height=\"30\" rx=\"6\" fill=\"{}\" stroke=\"#98a2b3\"/>\
             <text x=\"{cx}\" y=\"28\" text-anchor=\"middle\" font-size=\"12\" font-weight=\"600\" fill=\"#1d2430\">{}</text></g>",
            esc(name),
            esc(name),
            TOP - 18,
            height - 8,
            cx - LANE / 2 + 8,
            LANE - 16,
            if is_reactor { "#ecfdf3" } else { "#eef4ff" },
            esc(&cut(&lane_title(name), 28)),
        );
    }
    for (n, row) in rows.iter().enumerate() {
        let y = TOP + n * ROW + ROW / 2;
        let color = row.kind.color();
        let class = row.kind.class();
        let _ = write!(
            s,
            "<g class=\"arrow {class}\" data-kind=\"{class}\"><title>{}</title>",
            esc(&row.detail)
        );
        if row.from == row.to {
            // A note on the lane.
            let cx = x(row.to);
            let text = cut(&row.label, 34);
            let w = (text.chars().count() * 7 + 16).min(LANE - 10);
            let _ = write!(
                s,
                "<rect x=\"{}\" y=\"{}\" width=\"{w}\" height=\"22\" rx=\"4\" fill=\"#fff\" stroke=\"{color}\" stroke-width=\"1.5\"/>\
                 <text x=\"{cx}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" fill=\"{color}\">{}</text>",
                cx - w / 2,
                y - 11,
                y + 4,
                esc(&text)
            );
        } else {
            let (x1, x2) = (x(row.from), x(row.to));
            let span = x1.abs_diff(x2);
            let (a, b) = if x1 < x2 {
                (x1 + 4, x2 - 4)
            } else {
                (x1 - 4, x2 + 4)
            };
            let text = cut(&row.label, span / 7);
            let _ = write!(
                s,
                "<line x1=\"{a}\" y1=\"{y}\" x2=\"{b}\" y2=\"{y}\" stroke=\"{color}\" stroke-width=\"2\"{} marker-end=\"url(#head-{class})\"/>\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" fill=\"{color}\">{}</text>",
                if row.kind.dashed() {
                    " stroke-dasharray=\"6 4\""
                } else {
                    ""
                },
                (x1 + x2) / 2,
                y - 5,
                esc(&text)
            );
        }
        s.push_str("</g>");
    }
    s.push_str("</svg></div>");
    s
}
