//! The daemon's HTTP endpoint on `daemon.listen`: `GET /healthz` and `GET /metrics`.
//!
//! Both answer from [`Telemetry`] alone, never from the object stores, so a scrape is cheap
//! and answers even while a replica hangs. `/healthz` is `200 ok`, or `503` with one reason per
//! line (capture lag or snapshot age beyond the `[daemon]` limits, a failing replica, a failed
//! drill).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::metrics::{health, render, Telemetry};

/// Serve until `token` is cancelled. A port that cannot be bound is logged and the daemon goes
/// on backing up: losing the endpoint must not stop the backups (monitoring sees it missing).
pub async fn serve(listen: SocketAddr, telemetry: Arc<Telemetry>, token: CancellationToken) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot serve /healthz and /metrics: binding daemon.listen failed; backups go on");
            return;
        }
    };
    tracing::info!(%listen, "serving /healthz and /metrics");
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(telemetry);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(token.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(%listen, error = %e, "the health and metrics endpoint stopped");
    }
}

async fn healthz(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    let reasons = health(&t.view(), &t.limits, Utc::now());
    if reasons.is_empty() {
        let mut body = "ok\n".to_string();
        for note in t.view().notes {
            body.push_str(&note);
            body.push('\n');
        }
        (StatusCode::OK, body)
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy\n{}\n", reasons.join("\n")),
        )
    }
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&t.view(), &t.limits, Utc::now()),
    )
}
