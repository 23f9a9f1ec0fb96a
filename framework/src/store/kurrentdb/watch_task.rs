//! The background task behind `watch_head`: a subscription to `$all`
//! (filtered like the store's reads) from the last head this store knows,
//! which moves the head when another process appends. The client's own
//! resubscription is not used: it would restart from the last event it
//! delivered, while this task restarts from the head, which also moves with
//! this handle's own appends. A notification only wakes readers; they read
//! `$all` themselves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{oneshot, watch};

use super::mapping::{AllFilter, position_of, subscribe_start};
use super::server::Server;
use crate::event::Position;

/// The first pause before resubscribing; doubled per failure up to
/// [`MAX_BACKOFF`], back to this after a subscription that lived long.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause before resubscribing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A subscription that lived this long resets the backoff.
const HEALTHY: Duration = Duration::from_secs(30);

/// Moves `head` forward (never back) to `position`; true when it moved.
pub(super) fn advance(head: &watch::Sender<Position>, position: Position) -> bool {
    head.send_if_modified(|current| {
        let moved = position > *current;
        if moved {
            *current = position;
        }
        moved
    })
}

/// Starts the task; it stops when the returned sender is dropped (with the
/// store's last handle).
pub(super) fn spawn(
    server: Arc<dyn Server>,
    filter: AllFilter,
    head: Arc<watch::Sender<Position>>,
) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(run(server, filter, head, stopped));
    stop
}

async fn run(
    server: Arc<dyn Server>,
    filter: AllFilter,
    head: Arc<watch::Sender<Position>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let server_filter = filter.server();
    let mut backoff = MIN_BACKOFF;
    loop {
        let from = *head.borrow();
        let mut events = server.subscribe_all(subscribe_start(from), &server_filter);
        let started = Instant::now();
        let reason = loop {
            tokio::select! {
                _ = &mut stopped => return,
                item = events.next() => match item {
                    Some(Ok(rec)) => {
                        if filter.matches(&rec.stream, &rec.event_type)
                            && let Ok(position) = position_of(rec.commit, rec.prepare)
                        {
                            advance(&head, position);
                        }
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "the subscription ended".to_owned(),
                },
            }
        };
        drop(events);
        if started.elapsed() >= HEALTHY {
            backoff = MIN_BACKOFF;
        }
        tracing::debug!(error = %reason, from = %*head.borrow(), "the $all subscription dropped; resubscribing from the head");
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
