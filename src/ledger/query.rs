//! Usage totals over a time range, grouped by any of tenant, model, user and day (UTC): one
//! query, written once for both stores (SQLite and PostgreSQL differ only in the words of
//! `Dialect`), and read back into the same rows.
use serde::Serialize;

use crate::error::{HearthError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Tenant,
    Model,
    User,
    Day,
}

impl GroupBy {
    /// `tenant,model,user,day` (any subset, any order).
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let g = match part {
                "tenant" => Self::Tenant,
                "model" => Self::Model,
                "user" => Self::User,
                "day" => Self::Day,
                other => {
                    return Err(HearthError::InvalidRequest(format!(
                        "group_by: unknown field `{other}` (expected tenant, model, user, day)"
                    )))
                }
            };
            if !out.contains(&g) {
                out.push(g);
            }
        }
        Ok(out)
    }

    fn column(self, d: Dialect) -> &'static str {
        match (self, d) {
            (Self::Tenant, _) => "tenant",
            (Self::Model, _) => "model",
            // No label and an empty one are one group, sorted alike by both stores.
            (Self::User, _) => "COALESCE(\"user\", '')",
            (Self::Day, Dialect::Sqlite) => "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
            (Self::Day, Dialect::Postgres) => {
                "to_char(to_timestamp(ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
        }
    }
}

/// Where the two stores' SQL differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The `i`th (from 1) positional parameter.
    pub(crate) fn param(self, i: usize) -> String {
        match self {
            Self::Sqlite => format!("?{i}"),
            Self::Postgres => format!("${i}"),
        }
    }

    /// Groups sort byte-wise in both stores, whatever PostgreSQL's database collation is.
    fn collate(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " COLLATE \"C\"",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// Unix seconds, inclusive; None: from the beginning.
    pub start: Option<i64>,
    /// Unix seconds, exclusive; None: until now.
    pub end: Option<i64>,
    /// Only this tenant's rows (a tenant key always sets it to its own).
    pub tenant: Option<String>,
    pub group_by: Vec<GroupBy>,
}

/// One group's totals; the grouping fields not asked for are absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct UsageRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub device_time_ms: f64,
    /// Requests answered by the response cache, and the device time their answers had taken.
    pub cache_hits: u64,
    pub saved_device_time_ms: f64,
}

/// A usage query as SQL, with its parameters: the range in Unix milliseconds, then the tenant
/// if there is one.
pub(crate) struct Select {
    pub sql: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub tenant: Option<String>,
}

impl UsageQuery {
    pub(crate) fn select(&self, d: Dialect) -> Select {
        let cols: Vec<&str> = self.group_by.iter().map(|g| g.column(d)).collect();
        let mut sql = String::from("SELECT ");
        for c in &cols {
            sql.push_str(c);
            sql.push_str(", ");
        }
        // The sums are cast back to integers: PostgreSQL sums BIGINTs into NUMERIC.
        sql.push_str(&format!(
            "COUNT(*), CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(cached_tokens) AS BIGINT), \
             CAST(SUM(completion_tokens) AS BIGINT), SUM(prefill_device_ms + decode_device_ms), \
             CAST(SUM(CASE WHEN cache <> '' THEN 1 ELSE 0 END) AS BIGINT), SUM(saved_device_ms) \
             FROM requests WHERE ts_ms >= {} AND ts_ms < {}",
            d.param(1),
            d.param(2)
        ));
        if self.tenant.is_some() {
            sql.push_str(&format!(" AND tenant = {}", d.param(3)));
        }
        if !cols.is_empty() {
            let order: Vec<String> = cols.iter().map(|c| format!("{c}{}", d.collate())).collect();
            sql.push_str(&format!(
                " GROUP BY {} ORDER BY {}",
                cols.join(", "),
                order.join(", ")
            ));
        }
        Select {
            sql,
            start_ms: self.start.map_or(i64::MIN, |s| s.saturating_mul(1000)),
            end_ms: self.end.map_or(i64::MAX, |e| e.saturating_mul(1000)),
            tenant: self.tenant.clone(),
        }
    }

    /// One result row of `select`, read through the store's typed getters. With no grouping and
    /// no rows both stores return one all-zero row: kept (a total).
    pub(crate) fn decode<E>(
        &self,
        text: impl Fn(usize) -> std::result::Result<Option<String>, E>,
        int: impl Fn(usize) -> std::result::Result<Option<i64>, E>,
        real: impl Fn(usize) -> std::result::Result<Option<f64>, E>,
    ) -> std::result::Result<UsageRow, E> {
        let mut row = UsageRow::default();
        for (i, g) in self.group_by.iter().enumerate() {
            let v = Some(text(i)?.unwrap_or_default());
            match g {
                GroupBy::Tenant => row.tenant = v,
                GroupBy::Model => row.model = v,
                GroupBy::User => row.user = v,
                GroupBy::Day => row.day = v,
            }
        }
        let n = self.group_by.len();
        let count = |i| int(i).map(|v| v.unwrap_or(0).max(0) as u64);
        row.requests = count(n)?;
        row.prompt_tokens = count(n + 1)?;
        row.cached_tokens = count(n + 2)?;
        row.completion_tokens = count(n + 3)?;
        row.device_time_ms = real(n + 4)?.unwrap_or(0.0);
        row.cache_hits = count(n + 5)?;
        row.saved_device_time_ms = real(n + 6)?.unwrap_or(0.0);
        Ok(row)
    }
}
