//! `aftermath`: the operators' command-line tool of an aftermath store
//! (SQLite file or PostgreSQL schema). See `aftermath --help`.

/// `print!` that ends the process quietly (exit 1) when stdout is closed
/// (`aftermath status --json | head`), instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => { $crate::write_out(&format!($($arg)*)) };
}

/// `println!`, as [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => { $crate::write_out(&format!("{}\n", format!($($arg)*))) };
}

mod commands;
mod console;
mod store;
mod table;

/// Writes `text` to stdout; a closed stdout ends the process quietly.
pub fn write_out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(i32::from(ERROR));
    }
}

use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use uuid::Uuid;

/// Exit code: done.
pub const OK: u8 = 0;
/// Exit code: an error (bad input, unreachable store, unknown name).
pub const ERROR: u8 = 1;
/// Exit code: the command line is wrong (clap's own code).
pub const USAGE: u8 = 2;
/// Exit code of `status` and `check`: something waits for an operator.
pub const NOT_SETTLED: u8 = 3;

const EXIT_CODES: &str = "\
Exit codes:
  0  done (status: nothing parked or blocked)
  1  error: a missing file or schema, an unreachable server, an unknown name, a store of
     another schema version (newer: upgrade the tool; older: `aftermath migrate`)
  2  usage: the command line is wrong
  3  status: something is parked or blocked and waits for an operator";

const MAIN_EXAMPLES: &str = "\
Examples:
  aftermath --sqlite shop.db status
  AFTERMATH_PG_URL=postgres://app@db/shop aftermath --schema shop status --watch
  aftermath --sqlite shop.db dead-letters
  aftermath --sqlite shop.db retry confirmation-mail 0190a5c3-9b1e-7c55-a1f2-7d1e7c0ffee0
  aftermath --sqlite shop.db timeline 0190a5c3-9b1e-7c55-a1f2-7d1e7c0ffee0 --mermaid";

/// Operate an aftermath store: subscriber status, dead letters, retry and
/// skip, process timelines, streams.
#[derive(Debug, Parser)]
#[command(name = "aftermath", version, after_help = format!("{MAIN_EXAMPLES}\n\n{EXIT_CODES}"))]
pub struct Cli {
    /// The SQLite store file (never created: it must exist).
    #[arg(long, global = true, value_name = "FILE", env = "AFTERMATH_SQLITE")]
    sqlite: Option<std::path::PathBuf>,
    /// The PostgreSQL store's URL (postgres://user@host:port/database).
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "AFTERMATH_PG_URL",
        hide_env_values = true
    )]
    postgres: Option<String>,
    /// The PostgreSQL schema of the store.
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        env = "AFTERMATH_PG_SCHEMA",
        default_value = "aftermath"
    )]
    schema: String,
    /// Print JSON (one document per command; one line per refresh with --watch).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every subscriber: checkpoint, lag, lease; and what is parked.
    #[command(after_help = format!("\
Lists every checkpoint of the store: projections, reactors, process runners and
partitions (<name>#<i>of<n>). LAG is the number of events after the checkpoint
(for a partition: of all partitions, so an upper bound, shown as ≤ n); AGE is
how long ago the oldest of them was recorded. STATE: held (n effects parked
or blocked), live or catching up (a worker holds the lease), stopped (its lease
ran out, behind the head), at head, or behind (no lease to tell whether it runs).

Examples:
  aftermath --sqlite shop.db status
  aftermath --sqlite shop.db status --watch
  aftermath --sqlite shop.db status --json | jq '.subscribers[].lag_events'
  aftermath --sqlite shop.db status >/dev/null || echo 'needs an operator'

{EXIT_CODES}"))]
    Status {
        /// Refresh every 2 seconds until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Parked effects, blocked effects, parked process instances, skipped
    /// projection events and parked inbox messages, with their errors.
    #[command(after_help = format!("\
Examples:
  aftermath --sqlite shop.db dead-letters
  aftermath --sqlite shop.db dead-letters --reactor confirmation-mail --json

{EXIT_CODES}"))]
    DeadLetters {
        /// Only the effects of this reactor.
        #[arg(long, value_name = "REACTOR")]
        reactor: Option<String>,
    },
    /// Run a parked effect again (or every parked effect of a reactor).
    #[command(after_help = format!("\
The reactor runs it on its next pass. Asks for confirmation on a terminal
unless --yes.

Examples:
  aftermath --sqlite shop.db retry confirmation-mail 0190a5c3-9b1e-7c55-a1f2-7d1e7c0ffee0
  aftermath --sqlite shop.db retry confirmation-mail --all --yes

{EXIT_CODES}"))]
    Retry {
        /// The reactor.
        reactor: String,
        /// The event whose effect is parked (see `dead-letters`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        event_id: Option<Uuid>,
        /// Every parked effect of the reactor.
        #[arg(long)]
        all: bool,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
    /// Give up a parked effect: it never runs, the events behind it go on.
    #[command(after_help = format!("\
Asks for confirmation on a terminal unless --yes.

Examples:
  aftermath --sqlite shop.db skip confirmation-mail 0190a5c3-9b1e-7c55-a1f2-7d1e7c0ffee0 --yes

{EXIT_CODES}"))]
    Skip {
        /// The reactor.
        reactor: String,
        /// The event whose effect is parked (see `dead-letters`).
        event_id: Uuid,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
    /// Release a parked process instance: handle its parked input (or send
    /// its failed command) again, then the inputs held behind it.
    #[command(after_help = format!("\
The instance is named by its stream (see `dead-letters` or `processes`); its
runner carries the release out on its next pass. Asks for confirmation on a
terminal unless --yes.

Examples:
  aftermath --sqlite shop.db retry-process fulfillment.process-order-42 --yes

{EXIT_CODES}"))]
    RetryProcess {
        /// The instance's stream, `<process>.process-<instance>`.
        stream: String,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
    /// Release a parked process instance, dropping its parked input (or not
    /// sending its failed command); the inputs held behind it go on.
    #[command(after_help = format!("\
Asks for confirmation on a terminal unless --yes.

Examples:
  aftermath --sqlite shop.db skip-process fulfillment.process-order-42 --yes

{EXIT_CODES}"))]
    SkipProcess {
        /// The instance's stream, `<process>.process-<instance>`.
        stream: String,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
    /// Everything that happened under one correlation id, as a causal tree.
    #[command(after_help = format!("\
Events of every stream (aggregates and process instances) with the reactors'
effects, each under its cause.

Examples:
  aftermath --sqlite shop.db timeline 0190a5c3-9b1e-7c55-a1f2-7d1e7c0ffee0
  aftermath --sqlite shop.db timeline 0190a5c3-9b1e-7c55-a1f2-7d1e7c0ffee0 --mermaid > order.mmd
  aftermath --sqlite shop.db timeline 0190a5c3-9b1e-7c55-a1f2-7d1e7c0ffee0 --json
  aftermath --sqlite shop.db timeline --stream order-1003
  aftermath --sqlite shop.db timeline --event a79599d7-d745-599d-9c3d-f6113b63ff7b

{EXIT_CODES}"))]
    Timeline {
        /// The correlation id.
        #[arg(required_unless_present_any = ["stream", "event"])]
        correlation_id: Option<Uuid>,
        /// Start from a stream instead: the conversation of its first event
        /// (a process instance's stream, an aggregate's).
        #[arg(long, value_name = "NAME", conflicts_with_all = ["correlation_id", "event"])]
        stream: Option<String>,
        /// Start from an event instead: the conversation it belongs to.
        #[arg(long, value_name = "EVENT_ID", conflicts_with = "correlation_id")]
        event: Option<Uuid>,
        /// Print a Mermaid sequence diagram (lanes = streams and reactors).
        #[arg(long, conflicts_with = "json")]
        mermaid: bool,
    },
    /// The streams of the log: version, event count, last write.
    #[command(after_help = format!("\
Examples:
  aftermath --sqlite shop.db streams
  aftermath --sqlite shop.db streams --category order

{EXIT_CODES}"))]
    Streams {
        /// Only the streams `<CATEGORY>-...`.
        #[arg(long, value_name = "CATEGORY")]
        category: Option<String>,
        /// At most this many streams.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// The events of one stream, with metadata.
    #[command(after_help = format!("\
Examples:
  aftermath --sqlite shop.db stream order-o-1
  aftermath --sqlite shop.db stream order-o-1 --from 10 --limit 5 --json

{EXIT_CODES}"))]
    Stream {
        /// The stream's name.
        name: String,
        /// The first version to print (versions start at 1).
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Process manager instances by state: running, completed, parked.
    #[command(after_help = format!("\
Examples:
  aftermath --sqlite shop.db processes
  aftermath --sqlite shop.db processes --process fulfillment --state parked

{EXIT_CODES}"))]
    Processes {
        /// Only the instances of this process manager.
        #[arg(long, value_name = "NAME")]
        process: Option<String>,
        /// Only instances in this state.
        #[arg(long, value_parser = ["running", "completed", "parked"])]
        state: Option<String>,
        /// At most this many instances.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Pending deadlines of process managers, earliest first.
    #[command(after_help = format!("\
Examples:
  aftermath --sqlite shop.db deadlines
  aftermath --sqlite shop.db deadlines --limit 20 --json

{EXIT_CODES}"))]
    Deadlines {
        /// At most this many deadlines.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Follow `$all`: print each new event as it is written, until Ctrl-C.
    #[command(after_help = format!("\
One line per event: position, time, stream and version, type, event id,
correlation id. Starts at the head (only new events) unless --from.

Examples:
  aftermath --sqlite shop.db tail
  aftermath --sqlite shop.db tail --category order --type OrderPlaced
  aftermath --sqlite shop.db tail --from 0 --json | jq .event_type

{EXIT_CODES}"))]
    Tail {
        /// Only events of this type (repeatable).
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        /// Only events of streams `<CATEGORY>-...` (repeatable).
        #[arg(long = "category", value_name = "CATEGORY")]
        categories: Vec<String>,
        /// Start after this position of `$all` (0: from the first event)
        /// instead of at the head.
        #[arg(long, value_name = "POSITION")]
        from: Option<u64>,
    },
    /// Serve the web console: live status, dead letters with retry and
    /// skip, timelines drawn as sequence diagrams.
    #[command(after_help = format!("\
Serves on http://127.0.0.1:4680/ by default and prints the address it bound
(with --port 0, a free port) and the token on stdout. Pages are read-only;
retry and skip need the token (typed into the page, or sent as
`Authorization: Bearer TOKEN`): without it they are refused (401, 403 for a
wrong one). A token is generated at start unless --token (or
AFTERMATH_CONSOLE_TOKEN) gives one; binding to an address other than
loopback requires an explicit token.

Examples:
  aftermath --sqlite shop.db console
  aftermath --sqlite shop.db console --port 0
  AFTERMATH_CONSOLE_TOKEN=s3cret aftermath --postgres postgres://app@db/shop console --bind 0.0.0.0

{EXIT_CODES}"))]
    Console {
        /// The address to listen on.
        #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// The port (0: any free port; the bound address is printed).
        #[arg(long, default_value_t = 4680)]
        port: u16,
        /// The token that retry and skip require (default: a random one,
        /// printed at start). Required with a non-loopback --bind.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "AFTERMATH_CONSOLE_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
    },
    /// Open the store and check its schema: this build must support it.
    #[command(after_help = format!("\
Fails (exit 1) with the reason on a file that is not an aftermath store, a
store of a newer schema version, or a server that cannot be reached.

Examples:
  aftermath --sqlite shop.db check
  aftermath --postgres postgres://app@db/shop --schema shop check --json

{EXIT_CODES}"))]
    Check,
    /// Bring an older store's schema up to this build's version.
    #[command(after_help = format!("\
The other commands refuse a store of an older schema version: opening it would
migrate it under the application running on it, and an application of the
older aftermath cannot open it any more. Upgrade the application (it migrates
at start), or migrate explicitly here. Asks for confirmation on a terminal
unless --yes.

Examples:
  aftermath --sqlite shop.db migrate
  aftermath --postgres postgres://app@db/shop --schema shop migrate --yes

{EXIT_CODES}"))]
    Migrate {
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
}

/// An error the user sees as one line on stderr.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// The line.
    pub message: String,
}

impl Failure {
    /// A plain error (exit code 1).
    pub fn error(message: impl Into<String>) -> Self {
        Failure {
            code: ERROR,
            message: message.into(),
        }
    }

    /// A usage error (exit code 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: USAGE,
            message: message.into(),
        }
    }
}

impl From<aftermath::StoreError> for Failure {
    fn from(e: aftermath::StoreError) -> Self {
        Failure::error(one_line(&e))
    }
}

/// `e` and its sources, on one line.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}

fn from_command_line(matches: &ArgMatches, id: &str) -> bool {
    matches!(matches.value_source(id), Some(ValueSource::CommandLine))
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // A store named on the command line beats one from the environment.
    let target = match (&cli.sqlite, &cli.postgres) {
        (Some(file), Some(url)) => {
            match (
                from_command_line(&matches, "sqlite"),
                from_command_line(&matches, "postgres"),
            ) {
                (true, false) => Some(store::Target::Sqlite(file.clone())),
                (false, true) => Some(store::Target::Postgres(url.clone())),
                _ => None,
            }
            .ok_or_else(|| {
                Failure::usage(
                    "both a SQLite file and a PostgreSQL URL are given: name one store (--sqlite or --postgres)",
                )
            })
        }
        (Some(file), None) => Ok(store::Target::Sqlite(file.clone())),
        (None, Some(url)) => Ok(store::Target::Postgres(url.clone())),
        (None, None) => Err(Failure::usage(
            "no store: give --sqlite FILE or --postgres URL (or set AFTERMATH_SQLITE or AFTERMATH_PG_URL)",
        )),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(ERROR);
        }
    };
    let outcome = match target {
        Ok(target) => runtime.block_on(commands::run(cli, target)),
        Err(f) => Err(f),
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
