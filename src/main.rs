//! The command line: parse, then hand over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "carpool",
    version,
    about = "Carpools deferrable LLM calls into provider batch jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        #[arg(long, default_value = "config/carpool.toml")]
        config: PathBuf,
        /// `text` or `json` log lines.
        #[arg(long, default_value = "text")]
        log_format: String,
    },
    /// Print the effective config with secrets masked, or every problem found.
    CheckConfig {
        #[arg(long, default_value = "config/carpool.toml")]
        config: PathBuf,
    },
    /// Run the simulated provider alone.
    Sim {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
    },
    /// Run the whole deferred flow on the embedded defaults and summarise it.
    Demo,
}

/// jemalloc rather than glibc's malloc: per pass-through call glibc spent
/// a tenth of carpool's time allocating, freeing and consolidating free
/// lists, and a held caller cost 18.5 KiB against 13.3 (see the README's
/// benchmark notes).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("carpool: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { config, log_format } => {
                carpool::app::serve_cli(&config, &log_format).await
            }
            Command::CheckConfig { config } => carpool::config::check_cli(&config),
            Command::Sim { listen } => carpool::sim::serve_cli(listen).await,
            Command::Demo => carpool::demo::cli().await,
        }
    })
}
