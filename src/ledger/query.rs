//! Usage totals over a time range, grouped by any of tenant, model, user and day (UTC).
use std::path::Path;

use rusqlite::{params_from_iter, Connection, OpenFlags};
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

    fn column(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Model => "model",
            Self::User => "user",
            Self::Day => "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
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

pub fn run(path: &Path, q: &UsageQuery) -> Result<Vec<UsageRow>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let cols: Vec<&str> = q.group_by.iter().map(|g| g.column()).collect();
    let mut sql = String::from("SELECT ");
    for c in &cols {
        sql.push_str(c);
        sql.push_str(", ");
    }
    sql.push_str(
        "COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), \
         SUM(prefill_device_ms + decode_device_ms), SUM(cache != ''), SUM(saved_device_ms) \
         FROM requests WHERE ts_ms >= ?1 AND ts_ms < ?2",
    );
    let mut args: Vec<rusqlite::types::Value> = vec![
        q.start.map_or(i64::MIN, |s| s.saturating_mul(1000)).into(),
        q.end.map_or(i64::MAX, |e| e.saturating_mul(1000)).into(),
    ];
    if let Some(t) = &q.tenant {
        sql.push_str(" AND tenant = ?3");
        args.push(t.clone().into());
    }
    if !cols.is_empty() {
        let list = cols.join(", ");
        sql.push_str(&format!(" GROUP BY {list} ORDER BY {list}"));
    }
    let mut st = conn.prepare(&sql)?;
    let n = cols.len();
    let rows = st.query_map(params_from_iter(args), |r| {
        let mut row = UsageRow::default();
        for (i, g) in q.group_by.iter().enumerate() {
            let v: Option<String> = r.get(i)?;
            let v = Some(v.unwrap_or_default());
            match g {
                GroupBy::Tenant => row.tenant = v,
                GroupBy::Model => row.model = v,
                GroupBy::User => row.user = v,
                GroupBy::Day => row.day = v,
            }
        }
        row.requests = r.get::<_, i64>(n)? as u64;
        row.prompt_tokens = r.get::<_, Option<i64>>(n + 1)?.unwrap_or(0) as u64;
        row.cached_tokens = r.get::<_, Option<i64>>(n + 2)?.unwrap_or(0) as u64;
        row.completion_tokens = r.get::<_, Option<i64>>(n + 3)?.unwrap_or(0) as u64;
        row.device_time_ms = r.get::<_, Option<f64>>(n + 4)?.unwrap_or(0.0);
        row.cache_hits = r.get::<_, Option<i64>>(n + 5)?.unwrap_or(0) as u64;
        row.saved_device_time_ms = r.get::<_, Option<f64>>(n + 6)?.unwrap_or(0.0);
        Ok(row)
    })?;
    // With no grouping and no rows, SQLite still returns one all-zero row: kept (a total).
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Ledger, Row};

    fn row(tenant: &str, model: &str, user: Option<&str>, ts_ms: i64, prompt: u64) -> Row {
        Row {
            ts_ms,
            request_id: format!("r{ts_ms}"),
            tenant: tenant.into(),
            key_id: "k".into(),
            user: user.map(String::from),
            model: model.into(),
            prompt_tokens: prompt,
            completion_tokens: 2,
            prefill_device_ms: 1.5,
            decode_device_ms: 0.5,
            finish_reason: "stop".into(),
            status: 200,
            ..Default::default()
        }
    }

    #[test]
    fn groups_filters_and_survives_a_reopen() {
        let dir = std::env::temp_dir().join(format!("hearth-ledger-{}", std::process::id()));
        let path = dir.join("usage.sqlite3");
        let _ = std::fs::remove_dir_all(&dir);
        let day = 86_400_000;
        {
            let l = Ledger::open(&path, 0);
            l.record(row("a", "m1", Some("u1"), 10 * day, 10));
            l.record(row("a", "m2", None, 10 * day + 5, 20));
            l.record(row("b", "m1", Some("u2"), 11 * day, 40));
            l.close();
        }
        let l = Ledger::open(&path, 0);
        let all = l.query(&UsageQuery::default()).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            (
                all[0].requests,
                all[0].prompt_tokens,
                all[0].completion_tokens
            ),
            (3, 70, 6)
        );
        assert!((all[0].device_time_ms - 6.0).abs() < 1e-9);
        let by = |g: &str, tenant: Option<&str>| {
            l.query(&UsageQuery {
                group_by: GroupBy::parse_list(g).unwrap(),
                tenant: tenant.map(String::from),
                ..Default::default()
            })
            .unwrap()
        };
        let t = by("tenant", None);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].tenant.as_deref(), t[0].requests), (Some("a"), 2));
        let d = by("day,tenant", None);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].day.as_deref(), Some("1970-01-11"));
        assert_eq!(d[1].day.as_deref(), Some("1970-01-12"));
        let only_b = by("model,user", Some("b"));
        assert_eq!(only_b.len(), 1);
        assert_eq!(only_b[0].user.as_deref(), Some("u2"));
        let range = l
            .query(&UsageQuery {
                start: Some(11 * 86_400),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(range[0].requests, 1);
        assert!(GroupBy::parse_list("tenant,cost").is_err());
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ledger_from_before_the_response_cache_and_quality_gains_their_columns() {
        let dir = std::env::temp_dir().join(format!("hearth-ledger-old-{}", std::process::id()));
        let path = dir.join("usage.sqlite3");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            // The table as it was: no cache columns, one row.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE requests (id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, \
                 request_id TEXT NOT NULL, tenant TEXT NOT NULL, key_id TEXT NOT NULL, user TEXT, \
                 model TEXT NOT NULL, route TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, \
                 cached_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, \
                 prefill_device_ms REAL NOT NULL, decode_device_ms REAL NOT NULL, \
                 queue_ms REAL NOT NULL, ttft_ms REAL, e2e_ms REAL NOT NULL, \
                 finish_reason TEXT NOT NULL, status INTEGER NOT NULL);
                 INSERT INTO requests VALUES (1, 5, 'r', 'a', 'k', NULL, 'm', '', 1, 0, 1, 1.0, \
                 1.0, 0.0, NULL, 1.0, 'stop', 200);",
            )
            .unwrap();
        }
        let l = Ledger::open(&path, 0);
        l.record(Row {
            cache: "semantic".into(),
            saved_device_ms: 40.0,
            ..row("a", "m", None, 10, 3)
        });
        l.close();
        let l = Ledger::open(&path, 0);
        let all = l.query(&UsageQuery::default()).unwrap();
        assert_eq!((all[0].requests, all[0].cache_hits), (2, 1));
        assert!((all[0].saved_device_time_ms - 40.0).abs() < 1e-9);
        drop(l);
        // The quality columns came too: a row with signals, an old row without.
        let l = Ledger::open(&path, 0);
        l.record(Row {
            quality: Some(crate::quality::Quality {
                tokens: 4,
                mean_logprob: -0.5,
                p10_logprob: -1.5,
                min_logprob: -2.0,
                mean_entropy: 0.8,
                mean_margin: Some(3.0),
                repetition: 0.25,
                stopped_on_length: true,
            }),
            ..row("a", "m", None, 20, 3)
        });
        l.close();
        let c = Connection::open(&path).unwrap();
        let got: Vec<(Option<f64>, Option<f64>, Option<bool>)> = c
            .prepare("SELECT mean_logprob, mean_margin, length_stop FROM requests ORDER BY ts_ms")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<std::result::Result<_, rusqlite::Error>>()
            .unwrap();
        assert_eq!(got[0], (None, None, None));
        assert_eq!(got[2], (Some(-0.5), Some(3.0), Some(true)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
