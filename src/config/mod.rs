//! Configuration: raw TOML plus `CARPOOL_…` overrides, validated into typed settings.

use std::path::Path;
use std::process::ExitCode;

pub fn check_cli(_path: &Path) -> ExitCode {
    ExitCode::FAILURE
}
