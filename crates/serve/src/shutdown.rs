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
/// `grace` before returning. Connections that do not send a request's headers
/// within [`crate::control::HEADER_READ_TIMEOUT`] are closed, so slow or idle
/// clients cannot hold sockets and tasks open.
pub async fn serve(listener: TcpListener, app: Router, shutdown: Shutdown, grace: Duration) -> std::io::Result<()> {
    // Every connection task holds a receiver; the loop waits for all to drop.
    let (conn_tx, conn_rx) = watch::channel(());
    let (close_tx, _) = watch::channel(false);
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    eprintln!("vicugna: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.clone().wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let mut req = req.map(axum::body::Body::new);
            // The web page's per-address limits and logs read the client address.
            req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
            tower::ServiceExt::oneshot(app.clone(), req)
        });
        let conn_rx = conn_rx.clone();
        let mut close_rx = close_tx.subscribe();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(crate::control::HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    r = close_rx.changed() => {
                        if r.is_err() {
                            // The grace period is over: cut the connection.
                            break;
                        }
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(conn_rx);
        });
    }
    drop(listener);
    let _ = close_tx.send(true);
    drop(conn_rx);
    // In-flight requests finish, for at most `grace`.
    let _ = tokio::time::timeout(grace, conn_tx.closed()).await;
    Ok(())
}
