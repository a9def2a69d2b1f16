//! Graceful shutdown: one signal shared by every server of a process, and a
//! grace period after which in-flight requests are cut rather than waited for.

use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Fires [`Shutdown`]; dropping it fires it too.
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl ShutdownTrigger {
    /// Tells every server holding the matching [`Shutdown`] to stop.
    pub fn fire(&self) {
        let _ = self.tx.send(true);
    }
}

/// Resolves once shutdown was asked for.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// A new trigger and the signal it fires.
pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl Shutdown {
    /// Waits for the trigger (or for the trigger to be dropped).
    pub async fn wait(mut self) {
        while !*self.rx.borrow() {
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether shutdown was asked for already.
    pub fn is_set(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn os_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Serves `app` until shutdown, then lets in-flight requests finish for at most
/// `grace` before returning.
pub async fn serve(listener: TcpListener, app: Router, shutdown: Shutdown, grace: Duration) -> std::io::Result<()> {
    // Connect info: the web page's per-address limits and logs need the client address.
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().wait());
    let deadline = async move {
        shutdown.wait().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r,
        _ = deadline => Ok(()),
    }
}
