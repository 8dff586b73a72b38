//! Identical requests in flight answered once: while a tenant's request is being generated, the
//! same request (the same exact key) waits for its answer instead of generating it again, then
//! takes it from the cache as an exact hit. A burst of the same question (a dashboard's many
//! clients, a retried call) costs one generation. A leader that ends without keeping an answer
//! (its client left, it failed, the answer was too large) says so, and its waiters generate at
//! once rather than queue behind one another.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

type Key = (Arc<str>, [u8; 32]);

/// The requests being generated, by tenant and exact key.
#[derive(Default)]
pub struct InFlight {
    leaders: Mutex<HashMap<Key, watch::Receiver<bool>>>,
}

/// Whether a request generates its answer or waits for the same request's.
pub enum Turn {
    Lead(Leader),
    /// For `wait`: resolves when the leader is gone.
    Wait(watch::Receiver<bool>),
}

/// Held by the generating request; dropping it (after its answer is in the cache, or when it
/// ends without one) wakes the waiters, which look the cache up again.
pub struct Leader {
    inflight: Arc<InFlight>,
    key: Key,
    /// True once the answer is in the cache; dropped when the leader ends.
    kept: watch::Sender<bool>,
}

impl Leader {
    /// The answer is in the cache: the waiters will find it.
    pub fn kept(&self) {
        self.kept.send_replace(true);
    }
}

impl InFlight {
    pub fn turn(self: &Arc<Self>, tenant: &Arc<str>, exact: [u8; 32]) -> Turn {
        let key = (tenant.clone(), exact);
        let mut leaders = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = leaders.get(&key) {
            return Turn::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(false);
        leaders.insert(key.clone(), rx);
        Turn::Lead(Leader {
            inflight: self.clone(),
            key,
            kept: tx,
        })
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Out of the map first, so a request arriving from now on leads rather than waits; the
        // sender drops after this body, which wakes the waiters.
        self.inflight
            .leaders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Wait for the leader to be gone; whether it kept an answer.
pub async fn wait(mut rx: watch::Receiver<bool>) -> bool {
    // Err once the sender is dropped, which is what this waits for.
    while rx.changed().await.is_ok() {}
    let kept = *rx.borrow();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leads_the_same_key_waits_and_is_woken_when_it_ends() {
        let f = Arc::new(InFlight::default());
        let (a, b): (Arc<str>, Arc<str>) = ("team-a".into(), "team-b".into());
        let Turn::Lead(leader) = f.turn(&a, [1; 32]) else {
            panic!("the first request leads");
        };
        let Turn::Wait(rx) = f.turn(&a, [1; 32]) else {
            panic!("the same request waits");
        };
        assert!(
            matches!(f.turn(&a, [2; 32]), Turn::Lead(_)),
            "another key leads"
        );
        assert!(
            matches!(f.turn(&b, [1; 32]), Turn::Lead(_)),
            "another tenant never waits for this one"
        );
        let waiter = tokio::spawn(wait(rx));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        leader.kept();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "woken when the leader is gone");
        drop(leader);
        let kept = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert!(kept);
        assert!(
            f.leaders.lock().unwrap().is_empty(),
            "the leader left the map"
        );
        assert!(
            matches!(f.turn(&a, [1; 32]), Turn::Lead(_)),
            "the next one leads"
        );
    }

    #[tokio::test]
    async fn a_waiter_that_arrives_after_the_leader_ended_does_not_hang() {
        let f = Arc::new(InFlight::default());
        let t: Arc<str> = "t".into();
        let Turn::Lead(leader) = f.turn(&t, [3; 32]) else {
            panic!("leads");
        };
        let Turn::Wait(rx) = f.turn(&t, [3; 32]) else {
            panic!("waits");
        };
        drop(leader);
        let kept = tokio::time::timeout(std::time::Duration::from_secs(5), wait(rx))
            .await
            .expect("returns at once");
        assert!(!kept, "it ended without an answer");
    }
}
