//! `aftermath console` run as a process: its JSON endpoints and pages on a
//! store the library filled, the token that retry and skip need, and (when
//! Chromium is installed) a real headless browser against stores filled by
//! the fulfillment and shop examples: the declined-card order's timeline
//! with its compensation arrows, and a click on Retry that releases the
//! shop's parked effect in the store.
//!
//! The browser test prints `SKIPPED console browser test: ...` when Chromium
//! or chromedriver is missing, unless `AFTERMATH_CHROMIUM` names the browser
//! (CI sets it): then a missing or broken one fails. Its screenshots are
//! kept in `$CARGO_TARGET_DIR/console-artifacts/` (the path is printed).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aftermath::SqliteStore;
use serde_json::{Value, json};

use common::http::{self, Response};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The binary, with no store or token from the environment.
fn aftermath() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aftermath"));
    cmd.env_remove("AFTERMATH_SQLITE")
        .env_remove("AFTERMATH_PG_URL")
        .env_remove("AFTERMATH_PG_SCHEMA")
        .env_remove("AFTERMATH_CONSOLE_TOKEN");
    cmd
}

/// `aftermath --sqlite path ARGS --json`, parsed.
fn json_of(path: &Path, args: &[&str]) -> Value {
    let out = aftermath()
        .arg("--sqlite")
        .arg(path)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A running console; killed when dropped.
struct Console {
    child: Child,
    /// `127.0.0.1:port`.
    addr: String,
    token: String,
}

impl Console {
    fn start(store: &Path) -> Console {
        let mut child = aftermath()
            .arg("--sqlite")
            .arg(store)
            .args(["console", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut addr, mut token) = (None, None);
        while addr.is_none() || token.is_none() {
            let Some(Ok(line)) = lines.next() else {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("the console ended before printing its address: {err}");
            };
            if let Some(url) = line.strip_prefix("listening on http://") {
                addr = Some(url.trim_end_matches('/').to_owned());
            }
            if let Some(t) = line.strip_prefix("token for retry and skip: ") {
                token = Some(t.to_owned());
            }
        }
        // Keep reading: the console's stdout stays open.
        std::thread::spawn(move || lines.for_each(drop));
        Console {
            child,
            addr: addr.unwrap(),
            token: token.unwrap(),
        }
    }

    fn get(&self, path: &str) -> Response {
        http::get(&self.addr, path)
    }

    fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        http::request("POST", &self.addr, path, &headers, Some(&body.to_string()))
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn console_serves_status_dead_letters_and_timelines_and_retry_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.db");
    let filled = runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        common::fill(&store).await
    });
    let console = Console::start(&path);
    assert_eq!(console.token.len(), 32, "a generated token");

    // Status: the same report as `status --json`.
    let status = console.get("/api/status");
    assert_eq!(status.status, 200);
    let report = status.json();
    assert_eq!(report["needs_attention"], true);
    let mailer = report["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "mailer")
        .unwrap();
    assert_eq!(mailer["state"], "held");
    let page = console.get("/");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("/api/status"),
        "the page polls the report"
    );
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "no CDN"
    );
    // DNS rebinding: a page of another name re-pointed at 127.0.0.1.
    let foreign = http::request(
        "GET",
        &console.addr,
        "/api/status",
        &[("Host", "attacker.example:4680")],
        None,
    );
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    let local = http::request(
        "GET",
        &console.addr,
        "/api/status",
        &[("Host", "localhost:4680")],
        None,
    );
    assert_eq!(local.status, 200);

    // Dead letters: the parked effect with its error and buttons.
    let page = console.get("/dead-letters");
    assert_eq!(page.status, 200);
    let parked = filled.parked.to_string();
    assert!(page.body.contains(&format!("data-event=\"{parked}\"")));
    assert!(page.body.contains("mail service refused: unlucky order"));
    assert!(page.body.contains("data-action=\"retry\""));
    let list = console.get("/api/dead-letters").json();
    assert_eq!(list["effects"][0]["event_id"], parked);

    // Retry and skip: refused without the token, or with a wrong one.
    let body = json!({"reactor": "mailer", "event_id": parked});
    let refused = console.post("/api/retry", None, &body);
    assert_eq!(refused.status, 401, "{}", refused.body);
    let refused = console.post("/api/skip", Some("not-the-token"), &body);
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(
        json_of(&path, &["dead-letters"])["effects"][0]["state"],
        "parked",
        "nothing changed"
    );
    let done = console.post("/api/retry", Some(&console.token), &body);
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.json()["action"], "retry");
    assert_eq!(
        json_of(&path, &["dead-letters"])["effects"][0]["state"],
        "retry_requested",
        "the store has the operator's retry"
    );
    let again = console.post("/api/retry", Some(&console.token), &body);
    assert_eq!(again.status, 409, "no longer parked: {}", again.body);

    // Timeline: a sequence diagram of the conversation, by correlation id,
    // by stream or by event.
    let page = console.get(&format!("/timeline?id={}", filled.correlation));
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<svg id=\"sequence\""));
    assert!(page.body.contains("data-lane=\"order-o-1\""));
    assert!(page.body.contains("data-lane=\"reactor mailer\""));
    assert!(
        page.body.contains("class=\"arrow effect\""),
        "the done effect"
    );
    let by_stream = console.get("/timeline?stream=order-o-2");
    assert!(by_stream.body.contains("class=\"arrow effect-failed\""));
    assert!(by_stream.body.contains("mail service refused"));
    assert_eq!(console.get("/timeline?id=not-a-uuid").status, 400);
    let missing = console.get("/timeline?stream=nothing-here");
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("no stream `nothing-here`"));
    assert_eq!(console.get("/timeline").status, 200, "the index");
}

#[test]
fn console_refuses_a_non_loopback_address_without_a_token_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.db");
    runtime().block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        common::fill(&store).await
    });
    let out = aftermath()
        .arg("--sqlite")
        .arg(&path)
        .args(["console", "--bind", "0.0.0.0", "--port", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(out.stdout.is_empty(), "nothing served");

    // A port that is taken: one line, exit 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = aftermath()
        .arg("--sqlite")
        .arg(&path)
        .args(["console", "--port", &port])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: cannot listen on 127.0.0.1:"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let out = aftermath()
        .arg("--sqlite")
        .arg(dir.path().join("missing.db"))
        .arg("console")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no such file"), "{err}");
}

// ------------------------------------------------------------ the browser

/// Chromium and chromedriver, or why the browser test does not run.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let required = std::env::var_os("AFTERMATH_CHROMIUM");
    let chromium = required
        .clone()
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    let driver = std::env::var_os("AFTERMATH_CHROMEDRIVER")
        .map_or_else(|| PathBuf::from("/usr/bin/chromedriver"), PathBuf::from);
    let missing = [&chromium, &driver]
        .into_iter()
        .find(|p| !p.is_file())
        .map(|p| format!("{} is not installed", p.display()));
    match (missing, required) {
        (None, _) => Ok((chromium, driver)),
        (Some(why), None) => Err(why),
        (Some(why), Some(_)) => {
            panic!("AFTERMATH_CHROMIUM is set but {why} (apt-get install chromium chromium-driver)")
        }
    }
}

/// The target directory this test binary was built in.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // <target>/debug/deps/console-<hash>
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_owned()
}

/// Builds the example binaries and returns their directory.
fn examples() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = target_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    // Without the variables cargo set for this test (they would make the
    // examples' build differ from a plain `cargo build`, and rebuild both).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if (name.starts_with("CARGO_") && name != "CARGO_HOME" && name != "CARGO_TARGET_DIR")
            || name == "OUT_DIR"
        {
            build.env_remove(&*name);
        }
    }
    let status = build
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", &target)
        .args([
            "build",
            "-q",
            "-p",
            "aftermath-examples",
            "--bin",
            "fulfillment",
            "--bin",
            "shop",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "building the examples failed");
    target.join("debug")
}

fn run_example(bin: &Path, args: &[&Path]) {
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}{}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A chromedriver process and one headless Chromium session of it.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let addr = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver does not answer on {addr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--window-size=1400,1000".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let created = browser.call(
            "POST",
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": args},
            }}})),
        );
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_owned();
        browser
    }

    /// A WebDriver call; its `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        let r = http::request(method, &self.addr, path, &[], body.as_deref());
        let v = r.json();
        assert_eq!(r.status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn session(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn open(&self, url: &str) {
        self.session("POST", "/url", Some(json!({ "url": url })));
    }

    /// The elements matching a CSS selector, as WebDriver element ids.
    fn find_all(&self, css: &str) -> Vec<String> {
        let found = self.session(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        );
        found
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                // W3C's element key (or the legacy `ELEMENT`): its one value.
                e.as_object()
                    .and_then(|o| o.values().next())
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("not an element: {e}"))
                    .to_owned()
            })
            .collect()
    }

    /// Waits until `css` matches something; its elements.
    fn wait_for(&self, css: &str) -> Vec<String> {
        let started = Instant::now();
        loop {
            let found = self.find_all(css);
            if !found.is_empty() {
                return found;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "nothing matches `{css}` in: {}",
                self.source()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn text(&self, element: &str) -> String {
        self.session("GET", &format!("/element/{element}/text"), None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn click(&self, element: &str) {
        self.session(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        );
    }

    fn source(&self) -> String {
        self.session("GET", "/source", None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn screenshot(&self, file: &Path) {
        let png = self.session("GET", "/screenshot", None);
        std::fs::write(file, http::base64(png.as_str().unwrap())).unwrap();
        println!("screenshot: {}", file.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http::request(
                "DELETE",
                &self.addr,
                &format!("/session/{}", self.session),
                &[],
                None,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn browser_shows_the_compensations_of_the_declined_order_and_retries_a_parked_effect() {
    let (chromium, chromedriver) = match browser() {
        Ok(found) => found,
        Err(why) => {
            eprintln!("SKIPPED console browser test: {why}");
            return;
        }
    };
    let bin = examples();
    let dir = tempfile::tempdir().unwrap();
    let fulfillment = dir.path().join("fulfillment.db");
    let shop = dir.path().join("shop.db");
    run_example(&bin.join("fulfillment"), &[&fulfillment]);
    run_example(&bin.join("shop"), &[Path::new("--keep"), &shop]);
    let artifacts = target_dir().join("console-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();

    let browser = Browser::start(&chromium, &chromedriver);

    // The declined card: the saga's timeline, reached from the index.
    let orders = Console::start(&fulfillment);
    browser.open(&format!("http://{}/timeline", orders.addr));
    let links = browser.wait_for("#processes a");
    let declined = links
        .iter()
        .find(|l| browser.text(l).starts_with("B-"))
        .expect("the declined-card order B-… among the instances");
    browser.click(declined);
    browser.wait_for("svg#sequence");
    browser.screenshot(&artifacts.join("timeline-declined-card.png"));
    let compensations = browser.find_all("g.arrow.compensation line");
    assert!(
        !compensations.is_empty(),
        "a compensation arrow (a line, not a note): {}",
        browser.source()
    );
    let source = browser.source();
    assert!(source.contains("COMPENSATION Release"), "{source}");
    assert!(
        source.contains("REJECTED Charge: card declined"),
        "{source}"
    );
    assert!(!browser.find_all("g.arrow.rejection line").is_empty());
    assert!(!browser.find_all("g.arrow.command line").is_empty());
    assert!(!browser.find_all("g.arrow.effect line").is_empty());
    drop(orders);

    // A worker of a consumer group, holding one of two partitions.
    runtime().block_on(async {
        use aftermath::subscription::{Holder, LeaseStore};
        let store = SqliteStore::open(&shop).await.unwrap();
        let pod = Holder::new("pod-a");
        let ttl = std::time::Duration::from_secs(300);
        store.heartbeat("audit#*of2", &pod, ttl).await.unwrap();
        store
            .acquire("audit#1of2", &pod, ttl)
            .await
            .unwrap()
            .expect("free");
    });

    // The shop's parked mail: status shows it held, live; Retry releases it.
    let store = Console::start(&shop);
    browser.open(&format!("http://{}/", store.addr));
    let row = browser.wait_for("tr[data-subscriber=\"confirmation-mail\"]");
    assert!(
        browser.text(&row[0]).contains("held"),
        "{}",
        browser.text(&row[0])
    );
    let groups = browser.wait_for("tr[data-group=\"audit#*of2\"]");
    let texts: Vec<String> = groups.iter().map(|g| browser.text(g)).collect();
    assert_eq!(
        texts.len(),
        2,
        "the member and the unheld partition: {texts:?}"
    );
    assert!(
        texts[0].contains("pod-a") && texts[0].contains("1 (1)"),
        "{texts:?}"
    );
    assert!(
        texts[1].contains("(no holder)") && texts[1].contains("0 (1)"),
        "{texts:?}"
    );
    browser.screenshot(&artifacts.join("status.png"));

    let parked = json_of(&shop, &["dead-letters"])["effects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["reactor"] == "confirmation-mail" && e["state"] == "parked")
        .expect("the shop's parked mail")["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let button = format!("button.retry[data-event=\"{parked}\"]");

    // Without the token the click is refused and nothing changes.
    browser.open(&format!("http://{}/dead-letters", store.addr));
    let retry = browser.wait_for(&button);
    browser.click(&retry[0]);
    browser.wait_for("#message.error");
    let message = browser.find_all("#message");
    assert!(
        browser.text(&message[0]).contains("token"),
        "{}",
        browser.text(&message[0])
    );
    let state = |shop: &Path| {
        json_of(shop, &["dead-letters"])["effects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event_id"] == parked)
            .map(|e| e["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state(&shop).as_deref(), Some("parked"));

    // With the token (from the address the console printed): released.
    browser.open(&format!(
        "http://{}/dead-letters?token={}",
        store.addr, store.token
    ));
    let retry = browser.wait_for(&button);
    browser.click(&retry[0]);
    let started = Instant::now();
    while state(&shop).as_deref() != Some("retry_requested") {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the store never saw the retry: {:?}; page: {}",
            state(&shop),
            browser.source()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The page reloads and shows the new state.
    browser.wait_for(&format!(
        "tr[data-event=\"{parked}\"][data-state=\"retry_requested\"]"
    ));
    browser.screenshot(&artifacts.join("dead-letters-after-retry.png"));
    println!("console artifacts in {}", artifacts.display());
}
