//! A helper process under test: its stdout lines arrive on a channel (and
//! are echoed to stderr with its name), it can be asked to stop through
//! stdin, SIGKILLed, and it is killed when dropped. Shared by the
//! multi-process crash tests.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running helper process.
pub struct Child {
    name: String,
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far, in order.
    pub seen: Vec<String>,
}

impl Child {
    /// Starts `program` with `args`; `name` labels its output and failures.
    pub fn spawn(program: &str, name: &str, args: &[&str]) -> Child {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        let label = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{label}] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Child {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Its label.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next line within `timeout` (also kept in `seen`).
    pub fn next_line(&mut self, timeout: Duration) -> Result<String, mpsc::RecvTimeoutError> {
        let line = self.lines.recv_timeout(timeout)?;
        self.seen.push(line.clone());
        Ok(line)
    }

    /// Waits for a line accepted by `wanted` and returns it.
    ///
    /// # Panics
    ///
    /// When none comes within `timeout`, naming `what` and the lines seen.
    pub fn expect_line(
        &mut self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Ok(line) if wanted(&line) => return line,
                Ok(_) => {}
                Err(e) => panic!(
                    "`{}`: no {what} within {timeout:?} ({e}); saw {:?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// Waits for a line starting with one of `prefixes`; returns which one
    /// and the rest of the line.
    pub fn expect_any(&mut self, prefixes: &[&str], timeout: Duration) -> (usize, String) {
        let line = self.expect_line(&format!("line {prefixes:?}"), timeout, |l| {
            prefixes.iter().any(|p| l.starts_with(p))
        });
        let (i, prefix) = prefixes
            .iter()
            .enumerate()
            .find(|(_, p)| line.starts_with(**p))
            .expect("the line matched a prefix");
        (i, line[prefix.len()..].trim().to_owned())
    }

    /// Waits for a line starting with `prefix`; returns the rest of it.
    pub fn expect(&mut self, prefix: &str, timeout: Duration) -> String {
        self.expect_any(&[prefix], timeout).1
    }

    /// The lines printed so far (without waiting).
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// Writes one line to its stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to helper");
        stdin.flush().expect("flush");
    }

    /// Asks it to shut down gracefully (the line `stop`).
    pub fn stop(&mut self) {
        self.send("stop");
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill helper");
        self.child.wait().expect("reap helper");
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for it to exit.
    ///
    /// # Panics
    ///
    /// When it is still running after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "`{}` did not exit", self.name);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// For a helper binary: completes when a line `stop` arrives on stdin (or
/// stdin closes), the request [`Child`] sends for a graceful stop.
pub fn stop_on_stdin() -> tokio::sync::oneshot::Receiver<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(line) if line.trim() != "stop" => continue,
                _ => break,
            }
        }
        let _ = stop_tx.send(());
    });
    stop_rx
}
