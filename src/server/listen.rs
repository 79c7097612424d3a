//! The accept loop: one HTTP/1.1 connection task per accepted socket,
//! drained gracefully when the shutdown token fires.
//!
//! Why not `axum::serve`: it sniffs every connection for an HTTP/2 preface
//! first, and the 24 bytes it reads for that are handed back to HTTP/1 as a
//! separate first read, which makes hyper grow the connection's read buffer
//! from 8 to 16 KiB. A wait-mode caller holds its connection for as long as
//! a batch job takes, so that buffer is most of what tens of thousands of
//! held callers cost (`cargo bench --bench report`, section held). The SDKs
//! carpool serves speak HTTP/1.1 to it; h2c was never part of the contract.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Pause after an accept error (out of descriptors, say) before the next
/// accept, so a full process does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What bounds a connection (`[server]` keys).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `server.header_timeout`: a request head must arrive within it, from
    /// the moment the connection is ready for one, so an idle keep-alive
    /// connection is closed after it too (hyper starts the timer whenever
    /// it waits for a head, not while a call is in flight).
    pub header_timeout: Duration,
    /// `server.max_connections`: beyond it, no accept until one closes.
    pub max_connections: usize,
}

impl Limits {
    pub fn of(server: &crate::config::ServerConfig) -> Self {
        Self {
            header_timeout: server.header_timeout,
            max_connections: usize::try_from(server.max_connections)
                .unwrap_or(Semaphore::MAX_PERMITS)
                .min(Semaphore::MAX_PERMITS),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` fires, then stops accepting
/// and resolves once every open connection has finished its call in flight
/// and closed. The caller bounds that wait (`server.shutdown_grace`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    limits: Limits,
) {
    // Every route turned into its final service once, here: a router
    // called as it is would redo that for every request (axum's
    // `into_make_service` does the same).
    let app: Router = app.with_state(());
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    // Without a timer hyper silently drops its header timeout.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    // One permit per open connection, taken before the accept: over the cap
    // new connections wait in the kernel's backlog, costing carpool nothing.
    let open = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit,
            () = shutdown.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };
        // Streamed answers go out event by event, not when Nagle allows.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = connection.await {
                tracing::trace!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
