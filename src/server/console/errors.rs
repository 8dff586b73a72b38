//! The last requests that ended in an error, for the console's live view: a small ring per
//! tenant (one tenant's burst cannot push out another's), written when a ledger row with an error
//! status is, read per tenant (an admin reads all). Messages are cut short: a parse error quotes
//! the bad input, which may be large.
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

/// Entries kept per tenant: enough to see a burst, little enough to send every second.
const KEPT: usize = 20;

/// Characters of a message kept.
const MESSAGE_CHARS: usize = 200;

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
pub struct ErrorLog(Mutex<HashMap<String, VecDeque<ErrorEntry>>>);

impl ErrorLog {
    pub fn push(&self, mut e: ErrorEntry) {
        if let Some((cut, _)) = e.message.char_indices().nth(MESSAGE_CHARS) {
            e.message.truncate(cut);
            e.message.push('…');
        }
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let q = all.entry(e.tenant.clone()).or_default();
        if q.len() == KEPT {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// Newest first; only `tenant`'s when given.
    pub fn recent(&self, tenant: Option<&str>, n: usize) -> Vec<ErrorEntry> {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<ErrorEntry> = match tenant {
            Some(t) => all.get(t).into_iter().flatten().cloned().collect(),
            None => all.values().flatten().cloned().collect(),
        };
        out.sort_by_key(|e| std::cmp::Reverse(e.ts_ms));
        out.truncate(n);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tenant: &str, ts_ms: i64) -> ErrorEntry {
        ErrorEntry {
            ts_ms,
            tenant: tenant.into(),
            model: "m".into(),
            status: 400,
            reason: "refused".into(),
            message: String::new(),
            request_id: String::new(),
        }
    }

    #[test]
    fn keeps_each_tenants_newest_and_shows_a_tenant_only_its_own() {
        let log = ErrorLog::default();
        log.push(entry("quiet", 0));
        for i in 1..=(KEPT as i64 + 10) {
            log.push(entry("noisy", i));
        }
        let noisy = log.recent(Some("noisy"), usize::MAX);
        assert_eq!(noisy.len(), KEPT);
        assert_eq!(noisy[0].ts_ms, KEPT as i64 + 10, "newest first");
        // A burst of one tenant leaves another's errors in place.
        assert_eq!(log.recent(Some("quiet"), 5), vec![entry("quiet", 0)]);
        let all = log.recent(None, usize::MAX);
        assert_eq!(all.len(), KEPT + 1);
        assert_eq!(all.last().unwrap().tenant, "quiet");
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let log = ErrorLog::default();
        let mut e = entry("t", 0);
        e.message = "é".repeat(5000);
        log.push(e);
        let m = &log.recent(None, 1)[0].message;
        assert_eq!(m.chars().count(), MESSAGE_CHARS + 1);
        assert!(m.ends_with('…'));
    }
}
