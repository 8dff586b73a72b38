//! Tenants and API keys: a request's tenant comes from its bearer key and nothing else. The
//! directory is rebuilt from the config on reload (SIGHUP) and swapped in whole, so a rotated or
//! revoked key takes effect for the next request.
pub mod keys;
pub mod limits;

use std::sync::Arc;

use serde::Deserialize;

use crate::error::{HearthError, Result};
use keys::KeyDigest;

/// The tenant every request belongs to when no key is configured (local development).
pub const OPEN_TENANT: &str = "default";

/// One `[[tenants]]` entry of the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Keys as clients send them, or `sha256:<hex>` of them.
    pub api_keys: Vec<String>,
    /// Optional limits; absent means unlimited.
    pub requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute.
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
    /// Share of the engine under contention, relative to the other tenants'.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// This tenant's response-cache settings, over the global `[cache]` and the route's.
    #[serde(default)]
    pub cache: Option<crate::cache::CacheSettings>,
}

fn default_weight() -> u32 {
    1
}

impl TenantConfig {
    /// A tenant with these keys, no limits and weight 1.
    pub fn new(name: &str, api_keys: &[&str]) -> Self {
        Self {
            name: name.into(),
            api_keys: api_keys.iter().map(|k| k.to_string()).collect(),
            requests_per_minute: None,
            tokens_per_minute: None,
            max_concurrent: None,
            weight: default_weight(),
            cache: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
}

#[derive(Debug, PartialEq)]
pub struct Tenant {
    pub name: Arc<str>,
    pub limits: Limits,
    pub weight: u32,
    pub cache: Option<crate::cache::CacheSettings>,
}

/// Who sent a request, as its key says.
#[derive(Debug, Clone)]
pub enum Caller {
    Tenant {
        tenant: Arc<Tenant>,
        key_id: Arc<str>,
    },
    /// An admin key: reads every tenant's usage and the metrics; runs no inference.
    Admin { key_id: Arc<str> },
}

#[derive(Debug)]
enum Holder {
    Tenant(Arc<Tenant>),
    Admin,
}

/// Every configured key and whom it names.
#[derive(Debug)]
pub struct Directory {
    keys: Vec<(KeyDigest, Arc<str>, Holder)>,
    tenants: Vec<Arc<Tenant>>,
    /// Set when no key is configured: every request is this tenant's.
    open: Option<Arc<Tenant>>,
}

impl Directory {
    /// From the config's admin keys and tenants. Tenant names must be unique and usable as a
    /// metric label; no key may appear twice; weights are at least 1.
    pub fn new(admin_api_keys: &[String], tenants: &[TenantConfig]) -> Result<Self> {
        let bad = |m: String| HearthError::Config(m);
        let mut keys: Vec<(KeyDigest, Arc<str>, Holder)> = Vec::new();
        let mut add = |configured: &str, holder: Holder, whose: &str| -> Result<()> {
            let digest = KeyDigest::parse(configured).map_err(|e| bad(format!("{whose}: {e}")))?;
            if keys.iter().any(|(d, _, _)| d.matches(&digest)) {
                return Err(bad(format!("{whose}: a key is configured twice")));
            }
            let id = digest.id().into();
            keys.push((digest, id, holder));
            Ok(())
        };
        for k in admin_api_keys {
            add(k, Holder::Admin, "admin_api_keys")?;
        }
        let mut out = Vec::with_capacity(tenants.len());
        for t in tenants {
            let valid_name = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !valid_name {
                return Err(bad(format!(
                    "tenant name `{}`: use 1-64 of A-Z a-z 0-9 - _ .",
                    t.name
                )));
            }
            if out.iter().any(|o: &Arc<Tenant>| *o.name == *t.name) {
                return Err(bad(format!("tenant `{}` is configured twice", t.name)));
            }
            if t.weight == 0 {
                return Err(bad(format!(
                    "tenant `{}`: weight must be at least 1",
                    t.name
                )));
            }
            if t.api_keys.is_empty() {
                return Err(bad(format!("tenant `{}` has no api_keys", t.name)));
            }
            let tenant = Arc::new(Tenant {
                name: t.name.as_str().into(),
                limits: Limits {
                    requests_per_minute: t.requests_per_minute,
                    tokens_per_minute: t.tokens_per_minute,
                    max_concurrent: t.max_concurrent,
                },
                weight: t.weight,
                cache: t.cache.clone(),
            });
            for k in &t.api_keys {
                add(
                    k,
                    Holder::Tenant(tenant.clone()),
                    &format!("tenant `{}`", t.name),
                )?;
            }
            out.push(tenant);
        }
        let open = keys.is_empty().then(|| {
            Arc::new(Tenant {
                name: OPEN_TENANT.into(),
                limits: Limits::default(),
                weight: 1,
                cache: None,
            })
        });
        Ok(Self {
            keys,
            tenants: out,
            open,
        })
    }

    /// True when no key is configured and every request runs as tenant `default`.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// The configured tenants (the open one when none is).
    pub fn tenants(&self) -> Vec<Arc<Tenant>> {
        match &self.open {
            Some(t) => vec![t.clone()],
            None => self.tenants.clone(),
        }
    }

    /// The caller an `Authorization` header value names; `None` for a missing or unknown key
    /// (never when the directory is open). Every configured digest is compared, in constant time.
    pub fn authenticate(&self, authorization: Option<&str>) -> Option<Caller> {
        if let Some(t) = &self.open {
            return Some(Caller::Tenant {
                tenant: t.clone(),
                key_id: "".into(),
            });
        }
        let presented = KeyDigest::of(authorization.and_then(keys::bearer)?);
        let mut found = None;
        for (i, (digest, _, _)) in self.keys.iter().enumerate() {
            if digest.matches(&presented) && found.is_none() {
                found = Some(i);
            }
        }
        let (_, key_id, holder) = &self.keys[found?];
        Some(match holder {
            Holder::Tenant(t) => Caller::Tenant {
                tenant: t.clone(),
                key_id: key_id.clone(),
            },
            Holder::Admin => Caller::Admin {
                key_id: key_id.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, keys: &[&str]) -> TenantConfig {
        TenantConfig::new(name, keys)
    }

    #[test]
    fn keys_name_their_tenant_and_nothing_else_does() {
        let d = Directory::new(
            &["sk-admin".into()],
            &[
                tenant("team-a", &["sk-a1", "sk-a2"]),
                tenant("team-b", &["sk-b"]),
            ],
        )
        .unwrap();
        assert!(!d.is_open());
        let name = |h: &str| match d.authenticate(Some(h)) {
            Some(Caller::Tenant { tenant, .. }) => tenant.name.to_string(),
            Some(Caller::Admin { .. }) => "admin".into(),
            None => "none".into(),
        };
        assert_eq!(name("Bearer sk-a1"), "team-a");
        assert_eq!(name("Bearer sk-a2"), "team-a");
        assert_eq!(name("Bearer sk-b"), "team-b");
        assert_eq!(name("Bearer sk-admin"), "admin");
        assert_eq!(name("Bearer sk-c"), "none");
        assert_eq!(name("Bearer team-a"), "none");
        assert_eq!(name("sk-a1"), "none");
        assert!(d.authenticate(None).is_none());
    }

    #[test]
    fn no_keys_means_open_as_default() {
        let d = Directory::new(&[], &[]).unwrap();
        assert!(d.is_open());
        let Some(Caller::Tenant { tenant, .. }) = d.authenticate(None) else {
            panic!("open directory admits everyone");
        };
        assert_eq!(&*tenant.name, OPEN_TENANT);
    }

    #[test]
    fn bad_tenant_configs_are_refused() {
        let dup_key = [tenant("a", &["sk-1"]), tenant("b", &["sk-1"])];
        let dup_name = [tenant("a", &["sk-1"]), tenant("a", &["sk-2"])];
        let bad_name = [tenant("a b", &["sk-1"])];
        let no_keys = [tenant("a", &[])];
        for cfg in [&dup_key[..], &dup_name[..], &bad_name[..], &no_keys[..]] {
            assert!(Directory::new(&[], cfg).is_err(), "{cfg:?}");
        }
        let mut zero = tenant("a", &["sk-1"]);
        zero.weight = 0;
        assert!(Directory::new(&[], &[zero]).is_err());
        assert!(Directory::new(&["sk-1".into()], &[tenant("a", &["sk-1"])]).is_err());
    }
}
