//! Per-tenant rate limits: requests per minute and tokens per minute as token buckets (full at start,
//! refilled continuously), and a cap on concurrent requests. Tokens are charged as they are known:
//! the prompt at admission, the completion when it ends; a bucket in debt refuses new requests until
//! it refills. State is kept by tenant name, so a config reload that changes a limit keeps the
//! tenant's current levels.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Limits, Tenant};

/// Why a request was refused, and when a retry can pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub limit: &'static str,
    pub message: String,
    pub retry_after: Duration,
}

#[derive(Debug)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Self {
        Self {
            level: capacity,
            at: now,
        }
    }

    /// Refill at `per_minute` up to `per_minute` (a minute's worth is the burst).
    fn refill(&mut self, per_minute: f64, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * per_minute / 60.0).min(per_minute);
        self.at = now;
    }

    /// Time until the level reaches `need`.
    fn wait_for(&self, need: f64, per_minute: f64) -> Duration {
        Duration::from_secs_f64(((need - self.level) * 60.0 / per_minute.max(1e-9)).max(0.0))
    }
}

#[derive(Debug, Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// One tenant's counters.
#[derive(Debug, Default)]
pub struct TenantLimiter {
    buckets: Mutex<Buckets>,
    running: AtomicU32,
}

impl TenantLimiter {
    /// Admit one request with `prompt_tokens`, or say which limit refuses it.
    fn admit(
        self: &Arc<Self>,
        limits: &Limits,
        prompt_tokens: usize,
    ) -> Result<Admission, Refusal> {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(max) = limits.max_concurrent {
            if self.running.load(Ordering::Acquire) >= max {
                return Err(Refusal {
                    limit: "max_concurrent",
                    message: format!(
                        "max_concurrent: {max} requests of this tenant are already running"
                    ),
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        if let Some(rpm) = limits.requests_per_minute {
            let rpm = f64::from(rpm);
            let bucket = b.requests.get_or_insert_with(|| Bucket::full(rpm, now));
            bucket.refill(rpm, now);
            if bucket.level < 1.0 {
                return Err(Refusal {
                    limit: "requests_per_minute",
                    message: format!(
                        "requests_per_minute: over this tenant's {rpm} requests per minute"
                    ),
                    retry_after: bucket.wait_for(1.0, rpm),
                });
            }
        }
        if let Some(tpm) = limits.tokens_per_minute {
            let tpm = tpm as f64;
            let bucket = b.tokens.get_or_insert_with(|| Bucket::full(tpm, now));
            bucket.refill(tpm, now);
            if bucket.level <= 0.0 {
                return Err(Refusal {
                    limit: "tokens_per_minute",
                    message: format!(
                        "tokens_per_minute: over this tenant's {tpm} tokens per minute"
                    ),
                    retry_after: bucket.wait_for(f64::MIN_POSITIVE, tpm),
                });
            }
            bucket.level -= prompt_tokens as f64;
        }
        if let Some(bucket) = b
            .requests
            .as_mut()
            .filter(|_| limits.requests_per_minute.is_some())
        {
            bucket.level -= 1.0;
        }
        self.running.fetch_add(1, Ordering::AcqRel);
        Ok(Admission {
            limiter: self.clone(),
        })
    }

    /// Charge generated tokens to the tokens-per-minute bucket (it may go into debt).
    pub fn charge(&self, tokens: usize) {
        let mut b = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = b.tokens.as_mut() {
            bucket.level -= tokens as f64;
        }
    }
}

/// A running request's place under `max_concurrent`; released on drop.
#[derive(Debug)]
pub struct Admission {
    limiter: Arc<TenantLimiter>,
}

impl Admission {
    /// Where the request's completion tokens are charged.
    pub fn limiter(&self) -> Arc<TenantLimiter> {
        self.limiter.clone()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.limiter.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every tenant's limiter, by name.
#[derive(Debug, Default)]
pub struct Limiter {
    tenants: Mutex<HashMap<Arc<str>, Arc<TenantLimiter>>>,
}

impl Limiter {
    pub fn admit(&self, tenant: &Tenant, prompt_tokens: usize) -> Result<Admission, Refusal> {
        let limiter = {
            let mut map = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
            map.entry(tenant.name.clone()).or_default().clone()
        };
        limiter.admit(&tenant.limits, prompt_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(limits: Limits) -> Tenant {
        Tenant {
            name: "t".into(),
            limits,
            weight: 1,
            cache: None,
        }
    }

    #[test]
    fn requests_per_minute_allows_a_minutes_burst_then_refuses_with_a_retry_time() {
        let l = Limiter::default();
        let t = tenant(Limits {
            requests_per_minute: Some(3),
            ..Default::default()
        });
        let held: Vec<_> = (0..3).map(|_| l.admit(&t, 10).unwrap()).collect();
        let r = l.admit(&t, 10).unwrap_err();
        assert_eq!(r.limit, "requests_per_minute");
        // One request refills in 20 s at 3 per minute.
        assert!(
            r.retry_after > Duration::from_secs(19) && r.retry_after <= Duration::from_secs(20),
            "{r:?}"
        );
        drop(held);
    }

    #[test]
    fn tokens_per_minute_charges_prompts_then_completions() {
        let l = Limiter::default();
        let t = tenant(Limits {
            tokens_per_minute: Some(100),
            ..Default::default()
        });
        let a = l.admit(&t, 60).unwrap();
        let b = l.admit(&t, 30).unwrap();
        a.limiter().charge(20);
        let r = l.admit(&t, 1).unwrap_err();
        assert_eq!(r.limit, "tokens_per_minute");
        assert!(r.retry_after > Duration::from_secs(5), "{r:?}");
        drop((a, b));
    }

    #[test]
    fn max_concurrent_counts_running_requests_and_frees_on_drop() {
        let l = Limiter::default();
        let t = tenant(Limits {
            max_concurrent: Some(2),
            ..Default::default()
        });
        let a = l.admit(&t, 1).unwrap();
        let _b = l.admit(&t, 1).unwrap();
        assert_eq!(l.admit(&t, 1).unwrap_err().limit, "max_concurrent");
        drop(a);
        assert!(l.admit(&t, 1).is_ok());
        let open = tenant(Limits::default());
        let many: Vec<_> = (0..1000)
            .map(|_| l.admit(&open, 1_000_000).unwrap())
            .collect();
        assert_eq!(many.len(), 1000);
    }
}
