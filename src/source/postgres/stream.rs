//! Capture over the streaming replication protocol: `START_REPLICATION SLOT … LOGICAL` on a
//! replication connection, the server pushing each pgoutput message once as its WAL is
//! decoded, standby status updates confirming what is durable.
//!
//! Why: the SQL path (`pg_logical_slot_peek_binary_changes`) decodes the WAL again from the
//! slot's restart point on every pass (docs/BENCHMARKS.md measured 92-125 MB decoded per pass
//! on average); a walsender decodes each WAL byte once and keeps its place between passes.
//!
//! The protocol is spoken by `pg_walstream` (BSD-3-Clause): it hands over every XLogData's
//! raw pgoutput bytes (Begin, Commit and logical messages included), so the decoder in
//! [`super::pgoutput`] reads both paths, and it sends a standby status update only when asked,
//! with the flush position we give, so nothing is confirmed before its segment is durable on
//! the write quorum. Its TLS is rustls with aws-lc-rs, as sqlx's and object_store's.
//!
//! The connection lives across capture passes. Between passes a keeper task sends a status
//! update every third of the server's `wal_sender_timeout` (repeating the last confirmed
//! position: it confirms nothing new), so an idle or slow consumer is not disconnected; during
//! a pass, reading answers the server's keepalives. Any error drops the connection: the next
//! pass starts again at the chain's stored end, and the server sends every transaction that
//! commits after it again (`START_REPLICATION` at a position after the slot's confirmed one
//! skips what committed before it), so nothing is lost and nothing is stored twice.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pg_walstream::{
    CancellationToken, LogicalReplicationStream, ReplicationError, ReplicationStreamConfig,
    RetryConfig, SharedLsnFeedback,
};
use tokio::sync::{Mutex, MutexGuard};

use super::pgoutput::Lsn;
use crate::error::{Error, ErrorKind, Result};

/// How capture reads a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMethod {
    /// A replication connection (`START_REPLICATION`).
    Streaming,
    /// SQL: `pg_logical_slot_peek_binary_changes`, then `pg_replication_slot_advance`.
    Polling,
}

impl std::fmt::Display for CaptureMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CaptureMethod::Streaming => "streaming",
            CaptureMethod::Polling => "polling",
        })
    }
}

/// How a PostgreSQL source's capture reads its slot, as the daemon publishes it for `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaptureReport {
    pub method: CaptureMethod,
    /// Why it polls although `capture_method` is `auto`: the server's refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling_because: Option<String>,
}

/// A batch read waits at most this long for the next message (a heartbeat is emitted before
/// each pass, so a silent stream this long is stuck, not idle).
pub const STALL: Duration = Duration::from_secs(300);

/// Why a replication connection could not start.
#[derive(Debug)]
pub enum StartError {
    /// The server, the role or a pooler in between does not allow a replication connection
    /// (`max_wal_senders`, the `REPLICATION` attribute): capture polls over SQL instead.
    NotAllowed(String),
    /// Anything else (the slot held by another consumer, the server down): the pass fails.
    Failed(Error),
}

/// A running replication connection on one slot.
pub struct SlotStream {
    stream: Arc<Mutex<LogicalReplicationStream>>,
    feedback: Arc<SharedLsnFeedback>,
    keeper: tokio::task::JoinHandle<()>,
    /// Why the keeper's last status update failed (the connection is gone).
    broken: Arc<std::sync::Mutex<Option<String>>>,
}

impl SlotStream {
    /// Connect to `url` as a replication connection and start streaming `slot` (pgoutput,
    /// `publication`) from `from`: the chain's stored end, so the server skips every
    /// transaction that committed before it. `keepalive` is how often the keeper sends a
    /// status update between passes.
    pub async fn start(
        url: &str,
        slot: &str,
        publication: &str,
        from: Lsn,
        keepalive: Duration,
    ) -> std::result::Result<SlotStream, StartError> {
        let conninfo = replication_url(url).map_err(StartError::Failed)?;
        let config = ReplicationStreamConfig::builder(slot, publication)
            // The SQL path's options: pgoutput v1 and logical messages (the heartbeats).
            .with_protocol_version(1)
            .with_messages(true)
            // Status updates only when we send them (a confirmation, or the keeper).
            .with_feedback_interval(Duration::from_secs(3600))
            .with_connection_timeout(Duration::from_secs(30))
            // One attempt: the capture pass is the retry loop (with the daemon's backoff).
            .with_retry_config(RetryConfig {
                max_attempts: 1,
                initial_delay: Duration::from_millis(100),
                max_delay: Duration::from_millis(100),
                multiplier: 1.0,
                max_duration: Duration::from_secs(30),
                jitter: false,
            });
        let mut stream = LogicalReplicationStream::new(&conninfo, config)
            .await
            .map_err(|e| classify(slot, e))?;
        stream
            .start(Some(from.0))
            .await
            .map_err(|e| classify(slot, e))?;
        let feedback = stream.shared_lsn_feedback.clone();
        let stream = Arc::new(Mutex::new(stream));
        let broken = Arc::new(std::sync::Mutex::new(None));
        let keeper = tokio::spawn(keep_alive(stream.clone(), broken.clone(), keepalive));
        Ok(SlotStream {
            stream,
            feedback,
            keeper,
            broken,
        })
    }

    /// Read messages until the caller stops; each read waits at most [`STALL`].
    pub async fn reader(&self) -> Result<Reader<'_>> {
        self.check()?;
        Ok(Reader {
            stream: self.stream.lock().await,
            never: CancellationToken::new(),
        })
    }

    /// Confirm `lsn` to the server (flush and apply position): everything before it is
    /// durable and the slot may release its WAL. `false`: nothing was received on this
    /// connection yet, so no status update can carry it now; the first one after data
    /// arrives does.
    pub async fn confirm(&self, lsn: Lsn) -> Result<bool> {
        self.check()?;
        self.feedback.update_flushed_lsn(lsn.0);
        self.feedback.update_applied_lsn(lsn.0);
        let mut stream = self.stream.lock().await;
        if stream.current_lsn() == 0 {
            return Ok(false);
        }
        stream
            .send_feedback()
            .await
            .map_err(|e| stream_error("confirming a position", e))?;
        Ok(true)
    }

    /// Send the last status update and close the connection. The server process serving it
    /// may hold the slot a moment longer (see [`wait_released`]).
    pub async fn stop(mut self) {
        self.keeper.abort();
        // Its clone of the connection goes with it.
        let _ = (&mut self.keeper).await;
        let _ = self.stream.lock().await.stop().await;
    }

    fn check(&self) -> Result<()> {
        match self.broken.lock().expect("not poisoned").clone() {
            Some(why) => Err(Error::new(
                ErrorKind::Unavailable,
                format!("postgres: the replication connection is gone: {why}"),
            )),
            None => Ok(()),
        }
    }
}

impl Drop for SlotStream {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Wait (at most 10 s) until no server process holds `slot`: a closed replication
/// connection's walsender exits a moment after the socket closes, and until then the slot can
/// be neither dropped, nor advanced, nor streamed again.
pub async fn wait_released(conn: &mut sqlx::PgConnection, slot: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held: Option<i32> =
            sqlx::query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| super::pg_error("reading the slot", e))?
                .flatten();
        if held.is_none() || std::time::Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads one batch's messages; holds the connection (the keeper waits) until dropped.
pub struct Reader<'a> {
    stream: MutexGuard<'a, LogicalReplicationStream>,
    /// Never cancelled: a stall abandons the connection (the caller drops it), so a read may
    /// be cut anywhere and needs no cancellation point.
    never: CancellationToken,
}

impl Reader<'_> {
    /// The next pgoutput message. Keepalives are answered while it waits.
    pub async fn next(&mut self) -> Result<Bytes> {
        match tokio::time::timeout(STALL, self.stream.next_raw_event(&self.never)).await {
            Ok(Ok(raw)) => Ok(raw.data),
            Ok(Err(e)) => Err(stream_error("reading the replication stream", e)),
            Err(_) => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "postgres: the replication connection delivered nothing for {} s after a heartbeat",
                    STALL.as_secs()
                ),
            )),
        }
    }
}

/// Between passes: a status update every `every`, unless a pass is reading (it answers the
/// server's keepalives itself).
async fn keep_alive(
    stream: Arc<Mutex<LogicalReplicationStream>>,
    broken: Arc<std::sync::Mutex<Option<String>>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(mut stream) = stream.try_lock() else {
            continue;
        };
        if let Err(e) = stream.send_feedback().await {
            *broken.lock().expect("not poisoned") = Some(e.to_string());
            return;
        }
    }
}

/// `url` as a replication connection's URL (`replication=database`).
fn replication_url(url: &str) -> Result<String> {
    let mut parsed = url::Url::parse(url).map_err(|e| {
        Error::input(format!(
            "{}: not a PostgreSQL URL",
            crate::redact::mask_url(url)
        ))
        .with_source(e)
    })?;
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| k != "replication")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    parsed
        .query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("replication", "database");
    Ok(parsed.to_string())
}

/// A start failure: not allowed (fall back to polling), or a failure with a clear message.
fn classify(slot: &str, e: ReplicationError) -> StartError {
    let text = e.to_string();
    // The role may not start a walsender; the server runs none (`max_wal_senders = 0`) or
    // all are taken; a pooler in between does not pass replication connections on.
    let not_allowed = [
        "must be superuser or replication role",
        "permission denied to start WAL sender",
        "no pg_hba.conf entry for replication connection",
        "pg_hba.conf rejects replication connection",
        "exceeds max_wal_senders",
        "unsupported startup parameter",
    ];
    if not_allowed.iter().any(|m| text.contains(m)) {
        return StartError::NotAllowed(text);
    }
    if text.contains("is active for PID") {
        return StartError::Failed(
            Error::new(
                ErrorKind::Unavailable,
                format!("postgres: replication slot {slot} is in use by another consumer"),
            )
            .with_source(e)
            .with_hint("another timevault, or a tool such as pg_recvlogical, holds it; stop it (SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = ...) and the daemon retries"),
        );
    }
    StartError::Failed(stream_error("starting replication", e))
}

fn stream_error(what: &str, e: ReplicationError) -> Error {
    Error::new(ErrorKind::Unavailable, format!("postgres: {what}")).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_urls_keep_their_options() {
        assert_eq!(
            replication_url("postgres://u:p@h:5/db?sslmode=require").unwrap(),
            "postgres://u:p@h:5/db?sslmode=require&replication=database"
        );
        assert_eq!(
            replication_url("postgres://h/db?replication=true").unwrap(),
            "postgres://h/db?replication=database"
        );
        assert!(replication_url("not a url").is_err());
    }

    #[test]
    fn refusals_of_replication_fall_back_and_a_held_slot_is_named() {
        let refused = ReplicationError::PermanentConnection(
            "FATAL: must be superuser or replication role to start walsender".into(),
        );
        assert!(matches!(classify("s", refused), StartError::NotAllowed(_)));
        let held =
            ReplicationError::ReplicationSlot("replication slot \"s\" is active for PID 42".into());
        match classify("s", held) {
            StartError::Failed(e) => {
                assert!(e.to_string().contains("in use by another consumer"), "{e}")
            }
            StartError::NotAllowed(_) => panic!("a held slot is no reason to poll"),
        }
    }
}
