//! A throwaway PostgreSQL cluster of the test's own (initdb + pg_ctl into a
//! temporary directory, on a free port), for what cannot be done on the shared
//! server: a destination whose transaction counter is behind the source's
//! (a restore or a logical move), and prepared transactions
//! (`max_prepared_transactions` is 0 by default and needs a restart to change).
//!
//! Needs the server binaries of the local PostgreSQL (`initdb`, `pg_ctl`,
//! found through `pg_config --bindir` or under `/usr/lib/postgresql/*/bin`).
//! As root (CI), the cluster runs as the `postgres` OS user. The cluster is
//! stopped and removed when the value drops.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running cluster of the test's own.
pub struct TempCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// Where the PostgreSQL server binaries are.
fn bindir() -> Result<PathBuf, String> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("no PostgreSQL server binaries: /usr/lib/postgresql: {e}"))?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| "no initdb under /usr/lib/postgresql/*/bin".to_owned())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

impl TempCluster {
    /// Creates and starts a cluster with `settings` (`name=value` server
    /// options, e.g. `max_prepared_transactions=8`). Panics with the tool's
    /// output when that fails: the tests that use it run only where a
    /// server is expected.
    pub fn start(settings: &[&str]) -> TempCluster {
        let bin = bindir().unwrap_or_else(|e| panic!("a temporary PostgreSQL cluster: {e}"));
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "aftermath-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let cluster = TempCluster {
            dir,
            bin,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            cluster.run_checked(
                "chown",
                &["-R", "postgres:postgres", &cluster.dir_str()],
                false,
            );
        }
        let data = cluster.data();
        cluster.run_checked(
            &cluster.tool("initdb"),
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            true,
        );
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=16MB",
            cluster.port,
            cluster.dir_str()
        );
        for setting in settings {
            options.push_str(&format!(" -c {setting}"));
        }
        let log = cluster.dir.join("log").to_string_lossy().into_owned();
        cluster.run_checked(
            &cluster.tool("pg_ctl"),
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
            true,
        );
        cluster
    }

    /// The URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The server binary `name` (`pg_dump`, `psql`, ...) of the same version.
    pub fn tool(&self, name: &str) -> String {
        self.bin.join(name).to_string_lossy().into_owned()
    }

    fn dir_str(&self) -> String {
        self.dir.to_string_lossy().into_owned()
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    /// Runs `program args`, as the `postgres` OS user when `as_server` and
    /// running as root; panics with its output when it fails.
    pub fn run_checked(&self, program: &str, args: &[&str], as_server: bool) -> Output {
        let out = if as_server && self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--", program])
                .args(args)
                .current_dir(&self.dir)
                .output()
        } else {
            Command::new(program)
                .args(args)
                .current_dir(Path::new("/"))
                .output()
        }
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            panic!(
                "{program} {args:?} failed: {}\n{}\nserver log:\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let data = self.data();
        let pg_ctl = self.tool("pg_ctl");
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--", &pg_ctl])
                .args(args)
                .current_dir(&self.dir)
                .output()
        } else {
            Command::new(&pg_ctl).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
