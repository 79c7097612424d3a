//! The real carpool binary as a child process (`serve --config F
//! --log-format json`), and a read-only look at the SQLite store it keeps.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};
use tokio::time::Instant;

use super::{Server, PATIENCE};

/// What the reader thread saw on the child's stdout.
#[derive(Default)]
struct Output {
    /// Every JSON log line, in order.
    lines: Mutex<Vec<Value>>,
    /// Set once stdout is closed (the child exited).
    closed: AtomicBool,
}

/// The carpool binary, SIGKILLed when dropped (also when a test panics).
pub struct Binary {
    child: Child,
    addr: String,
    output: Arc<Output>,
}

impl Binary {
    /// Starts `carpool serve` on `config` with exactly `env` as its
    /// environment, and waits until it logs `carpool listening`.
    pub async fn start(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_carpool"))
            .args(["serve", "--log-format", "json", "--config"])
            .arg(config)
            .env_clear()
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let output = Arc::new(Output::default());
        let stdout = child.stdout.take().unwrap();
        let sink = output.clone();
        // Reads until the child exits, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lines.lock().unwrap().push(v);
                }
            }
            sink.closed.store(true, Ordering::SeqCst);
        });
        let mut binary = Self {
            child,
            addr: String::new(),
            output,
        };
        let listening = binary.until_log("carpool listening").await;
        binary.addr = listening["listen"].as_str().unwrap().to_owned();
        binary
    }

    /// The address it listens on, `127.0.0.1:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    /// Every JSON log line so far.
    pub fn logs(&self) -> Vec<Value> {
        self.output.lines.lock().unwrap().clone()
    }

    /// Waits for the first log line whose `message` is `message`.
    pub async fn until_log(&self, message: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            // Read `closed` first: a line pushed before it is then seen below.
            let closed = self.output.closed.load(Ordering::SeqCst);
            if let Some(v) = self
                .output
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|v| v["message"] == message)
            {
                return v.clone();
            }
            assert!(!closed, "carpool exited without logging {message:?}");
            assert!(
                Instant::now() < deadline,
                "carpool never logged {message:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, then reap (nothing if it has exited already).
    pub fn kill(&mut self) {
        if self.child.try_wait().unwrap().is_some() {
            return;
        }
        signal::kill(self.pid(), Signal::SIGKILL).unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM: carpool drains and exits; see [`Binary::exited`].
    pub fn terminate(&self) {
        signal::kill(self.pid(), Signal::SIGTERM).unwrap();
    }

    /// Waits for the process to exit; its status.
    pub async fn exited(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "carpool did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Server for Binary {
    fn url(&self, path: &str) -> String {
        Binary::url(self, path)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = signal::kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// A read-only connection to the SQLite store at `db` (while the binary
/// writes to it); close it when done.
pub async fn read_only(db: &Path) -> SqliteConnection {
    let opts = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .busy_timeout(Duration::from_secs(5));
    SqliteConnection::connect_with(&opts).await.unwrap()
}
