//! carpool's TOML config in front of the simulator, built from sensible
//! defaults and a few keys per test.

use std::path::{Path, PathBuf};

use carpool::sim::SimHandle;

/// The SHA-256 of a client key, hex, as `[[clients]] key_sha256` wants it.
pub fn key_sha256(key: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// `key = value` lines of one table; setting a key again replaces it.
#[derive(Default)]
struct Keys(Vec<(String, String)>);

impl Keys {
    fn set(&mut self, toml: &str) {
        for line in toml.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let key = line.split_once('=').map_or(line, |(k, _)| k).trim();
            match self.0.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = line.to_owned(),
                None => self.0.push((key.to_owned(), line.to_owned())),
            }
        }
    }

    fn table(&self, name: &str) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        let lines: Vec<&str> = self.0.iter().map(|(_, l)| l.as_str()).collect();
        format!("[{name}]\n{}\n\n", lines.join("\n"))
    }
}

/// One managed upstream named `sim` (every model, key in `UPSTREAM_KEY`),
/// `poll_interval = "50ms"`, no clients unless added.
pub struct SimConfig {
    dialect: String,
    base_url: String,
    server: Keys,
    store: Option<String>,
    clients: Vec<(String, String)>,
    batching: Keys,
    /// Further `[[upstreams]]` keys of the `sim` entry.
    upstream: Keys,
    extra: String,
}

impl SimConfig {
    pub fn new(dialect: &str, sim: &SimHandle) -> Self {
        let mut batching = Keys::default();
        batching.set("poll_interval = \"50ms\"");
        Self {
            dialect: dialect.to_owned(),
            base_url: sim.base_url(),
            server: Keys::default(),
            store: None,
            clients: Vec::new(),
            batching,
            upstream: Keys::default(),
            extra: String::new(),
        }
    }

    /// Sets `[server]` keys (`key = value` lines).
    pub fn server(mut self, keys: &str) -> Self {
        self.server.set(keys);
        self
    }

    /// Sets `[batching]` keys (`key = value` lines), replacing any already set.
    pub fn batching(mut self, keys: &str) -> Self {
        self.batching.set(keys);
        self
    }

    /// Sets further keys of the `sim` upstream (`key = value` lines), e.g.
    /// `flex = true`.
    pub fn upstream(mut self, keys: &str) -> Self {
        self.upstream.set(keys);
        self
    }

    /// Adds a `[[clients]]` entry for the caller key `key`.
    pub fn client(mut self, name: &str, key: &str) -> Self {
        self.clients.push((name.to_owned(), key_sha256(key)));
        self
    }

    /// Appends further TOML (other tables) after `[batching]`.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// For the binary: listen on 127.0.0.1:0, keep the store in SQLite at `db`.
    pub fn binary(mut self, db: &Path) -> Self {
        self.server.set("listen = \"127.0.0.1:0\"");
        self.store = Some(format!("sqlite://{}", db.display()));
        self
    }

    pub fn toml(&self) -> String {
        let mut text = self.server.table("server");
        if let Some(url) = &self.store {
            text.push_str(&format!("[store]\nurl = \"{url}\"\n\n"));
        }
        text.push_str(&format!(
            r#"[[upstreams]]
name = "sim"
dialect = "{}"
base_url = "{}"
api_key_env = "UPSTREAM_KEY"
auth = "managed"
models = ["*"]
"#,
            self.dialect, self.base_url
        ));
        for (_, line) in &self.upstream.0 {
            text.push_str(line);
            text.push('\n');
        }
        text.push('\n');
        for (name, sha) in &self.clients {
            text.push_str(&format!(
                "[[clients]]\nname = \"{name}\"\nkey_sha256 = \"{sha}\"\n\n"
            ));
        }
        text.push_str(&self.batching.table("batching"));
        text.push_str(&self.extra);
        text
    }

    /// Writes the TOML to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.toml()).unwrap();
        path.to_owned()
    }
}
