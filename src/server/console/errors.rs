//! The last requests that ended in an error, for the console's live view: a bounded ring, written
//! when a ledger row with an error status is, read per tenant (an admin reads all).
use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

/// Entries kept: enough to see a burst, little enough to send every second.
const KEPT: usize = 50;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorEntry {
    pub ts_ms: i64,
    pub tenant: String,
    pub model: String,
    pub status: u16,
    /// The ledger's ending: refused, error, or a cut stream's reason.
    pub reason: String,
    pub message: String,
    pub request_id: String,
}

#[derive(Debug, Default)]
pub struct ErrorLog(Mutex<VecDeque<ErrorEntry>>);

impl ErrorLog {
    pub fn push(&self, e: ErrorEntry) {
        let mut q = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() == KEPT {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// Newest first; only `tenant`'s when given.
    pub fn recent(&self, tenant: Option<&str>, n: usize) -> Vec<ErrorEntry> {
        let q = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        q.iter()
            .rev()
            .filter(|e| tenant.is_none_or(|t| e.tenant == t))
            .take(n)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tenant: &str, status: u16) -> ErrorEntry {
        ErrorEntry {
            ts_ms: 0,
            tenant: tenant.into(),
            model: "m".into(),
            status,
            reason: "refused".into(),
            message: String::new(),
            request_id: String::new(),
        }
    }

    #[test]
    fn keeps_the_newest_and_shows_a_tenant_only_its_own() {
        let log = ErrorLog::default();
        for i in 0..(KEPT + 10) {
            log.push(entry(if i % 2 == 0 { "a" } else { "b" }, 400 + i as u16));
        }
        let all = log.recent(None, usize::MAX);
        assert_eq!(all.len(), KEPT);
        assert_eq!(all[0].status, 400 + (KEPT + 9) as u16, "newest first");
        let a = log.recent(Some("a"), 5);
        assert_eq!(a.len(), 5);
        assert!(a.iter().all(|e| e.tenant == "a"));
    }
}
