//! Builds the shared state, starts the workers, serves, and shuts down.

use std::path::Path;
use std::process::ExitCode;

pub async fn serve_cli(_config: &Path, _log_format: &str) -> ExitCode {
    ExitCode::FAILURE
}
