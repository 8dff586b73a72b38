//! What metering and the ledger cost, measured directly (cargo bench --bench metering_cost): the
//! device-time split of one 64-sequence step, and a ledger row from `record` to its commit. Their
//! sum over a 64-stream run, against that run's time, bounds the overhead far below what an
//! end-to-end throughput A/B can resolve on a noisy machine (see benches/RESULTS.md). With
//! `HEARTH_BENCH_LEDGER_URL=postgres://...` (an empty database) the PostgreSQL ledger too.
use std::time::{Duration, Instant};

use hearth::engine::metering::{split, CostModel};
use hearth::ledger::{GroupBy, Ledger, Row, Target, UsageQuery};

fn main() {
    // SmolLM2-135M's constants (30 layers, hidden 576, vocab 49152, 9 heads x 64).
    let model = CostModel {
        per_token: 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536),
        per_logits_row: 576 * 49152,
        per_attended: 2 * 9 * 64,
        windows: vec![None; 30],
    };
    let steps = 20_000;
    let t = Instant::now();
    let mut sink = Duration::ZERO;
    for step in 0..steps {
        // 64 decoding sequences at contexts 40..104, as in the 64-stream benchmark.
        let costs: Vec<u128> = (0..64)
            .map(|i| model.cost(40 + (i + step) % 64, 1, true))
            .collect();
        sink += split(Duration::from_micros(95_000), &costs)[step % 64];
    }
    let per_step = t.elapsed().as_secs_f64() / steps as f64;
    println!(
        "split of a 64-sequence step: {:.2} us (checksum {})",
        per_step * 1e6,
        sink.as_nanos() % 7
    );

    let dir = std::env::temp_dir().join(format!("hearth-metering-cost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    ledger_cost(Target::Sqlite(dir.join("usage.sqlite3")));
    // A PostgreSQL ledger too, given one (an empty database: its `requests` table is dropped).
    if let Ok(url) = std::env::var("HEARTH_BENCH_LEDGER_URL") {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.batch_execute("DROP TABLE IF EXISTS requests").unwrap();
        ledger_cost(Target::parse(&url, None).unwrap());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A ledger row from `record` to its commit, and a usage query over the rows written.
fn ledger_cost(target: Target) {
    let ledger = Ledger::open(target.clone(), 400);
    let rows = 20_000;
    let t = Instant::now();
    for i in 0..rows {
        ledger.record(Row {
            ts_ms: 1_800_000_000_000 + i,
            request_id: format!("req-{i}"),
            tenant: ["team-a", "team-b", "team-c"][i as usize % 3].into(),
            key_id: "3f2a9c1b".into(),
            user: Some("alice".into()),
            model: "smollm2-135m-instruct".into(),
            prompt_tokens: 40,
            completion_tokens: 32,
            prefill_device_ms: 12.5,
            decode_device_ms: 80.25,
            queue_ms: 3.0,
            ttft_ms: Some(900.0),
            e2e_ms: 12_000.0,
            finish_reason: "length".into(),
            status: 200,
            ..Default::default()
        });
    }
    let queued = t.elapsed().as_secs_f64() / rows as f64;
    ledger.close();
    let committed = t.elapsed().as_secs_f64() / rows as f64;
    let store = match target {
        Target::Sqlite(_) => "sqlite",
        Target::Postgres(_) => "postgres",
    };
    println!(
        "ledger row ({store}): {:.2} us to queue on the request path, {:.2} us queued + committed (writer thread)",
        queued * 1e6,
        committed * 1e6
    );
    let q = UsageQuery {
        group_by: vec![GroupBy::Tenant, GroupBy::Day],
        ..Default::default()
    };
    let runs = 20;
    let t = Instant::now();
    for _ in 0..runs {
        assert_eq!(target.query(&q).unwrap().len(), 3);
    }
    println!(
        "usage query ({store}, {rows} rows, by tenant and day, connection included): {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / runs as f64
    );
}
