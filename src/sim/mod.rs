//! The simulated provider: both batch dialects on one port, faults on demand.

use std::net::SocketAddr;
use std::process::ExitCode;

pub async fn serve_cli(_listen: SocketAddr) -> ExitCode {
    ExitCode::FAILURE
}
