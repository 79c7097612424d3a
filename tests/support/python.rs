//! The Python SDK checks: the virtualenv `tests/run.sh` prepares
//! (`CARPOOL_PYTHON`) and a script run on a blocking thread.

use std::path::PathBuf;
use std::process::Command;

/// The virtualenv's interpreter; panics with the fix when it is missing.
pub fn python() -> PathBuf {
    let path = std::env::var_os("CARPOOL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        path.exists(),
        "{} not found: run `bash tests/run.sh`, which prepares the SDK virtualenv",
        path.display()
    );
    path
}

/// Runs `tests/<script>` with `args` and `env`; returns whether it exited
/// 0, and its stdout followed by its stderr.
pub async fn run(script: &str, args: Vec<String>, env: Vec<(String, String)>) -> (bool, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(path)
            .args(args)
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}
