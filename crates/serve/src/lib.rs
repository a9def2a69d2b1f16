//! vicugna-serve: FastChat-compatible serving. A controller that knows which
//! worker serves which model, model workers over the engine (continuous
//! batching), and an OpenAI-compatible gateway in front of them.
//!
//! The three speak FastChat's wire protocol ([`protocol`]), so a FastChat
//! worker can join a vicugna controller, and FastChat's own
//! `openai_api_server` can stand in front of vicugna workers.

pub mod control;
pub mod controller;
pub mod gateway;
pub mod leaderboard;
pub mod metrics;
pub mod protocol;
pub mod shutdown;
pub mod web;
pub mod worker;

pub use control::{ControlAuth, ControlSecret, WorkerHosts};
pub use controller::{Controller, ControllerOptions, DispatchMethod};
pub use gateway::{Gateway, GatewayOptions};
pub use shutdown::{os_signal, shutdown_channel, Shutdown, ShutdownTrigger};
pub use web::WebOptions;
pub use worker::{Worker, WorkerOptions};

use std::time::Duration;

use tokio::net::TcpListener;

/// `http://host:port` of a bound listener (`0.0.0.0`/`::` shown as 127.0.0.1).
pub fn listener_url(l: &TcpListener) -> std::io::Result<String> {
    let addr = l.local_addr()?;
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        ip => ip.to_string(),
    };
    Ok(format!("http://{host}:{}", addr.port()))
}

/// Runs a controller on `listener` until shutdown.
pub async fn run_controller(
    listener: TcpListener,
    opts: ControllerOptions,
    shutdown: Shutdown,
    grace: Duration,
) -> std::io::Result<()> {
    let app = controller::router(Controller::new(opts));
    shutdown::serve(listener, app, shutdown, grace).await
}

/// Runs a worker on `listener` until shutdown (registering and heartbeating
/// unless `opts.register` is off).
pub async fn run_worker(
    listener: TcpListener,
    worker: std::sync::Arc<Worker>,
    shutdown: Shutdown,
    grace: Duration,
) -> std::io::Result<()> {
    let hb = worker.options().register.then(|| worker.spawn_heartbeat());
    let r = shutdown::serve(listener, worker::router(worker), shutdown, grace).await;
    if let Some(h) = hb {
        h.abort();
    }
    r
}

/// Runs a gateway on `listener` until shutdown.
pub async fn run_gateway(
    listener: TcpListener,
    opts: GatewayOptions,
    shutdown: Shutdown,
    grace: Duration,
) -> std::io::Result<()> {
    let app = gateway::router(Gateway::new(opts));
    shutdown::serve(listener, app, shutdown, grace).await
}
