//! Fair share between tenants in the engine's admission, on SmolLM2: a tenant with a deep queue
//! cannot starve another tenant's single request, which used to wait behind all of them (FIFO).
mod common;

use hearth::engine::{EngineConfig, Event, Request, SamplingParams, SchedulerConfig};

fn request(tenant: &str, prompt: Vec<u32>) -> Request {
    Request {
        prompt,
        params: SamplingParams {
            max_tokens: Some(8),
            ignore_eos: true,
            ..SamplingParams::greedy()
        },
        tenant: Some(tenant.into()),
        weight: 1,
        constraint: None,
    }
}

/// Queue time reported by a request's `Finished` event.
fn queue_secs(rx: flume::Receiver<Event>) -> f64 {
    for ev in rx.iter() {
        if let Event::Finished { usage, .. } = ev {
            return usage.queue_secs;
        }
    }
    panic!("no finish");
}

#[test]
fn a_flooding_tenant_cannot_starve_another_tenants_request() {
    let max_seqs = 4;
    let e = common::engine(
        &common::smollm2(),
        EngineConfig {
            scheduler: SchedulerConfig {
                max_seqs,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    // Tenant A queues 60 requests, then tenant B sends one.
    let flood: Vec<_> = (0..60u32)
        .map(|i| {
            e.submit(request("a", vec![100 + i, 200, 300, 400]))
                .unwrap()
        })
        .collect();
    let b = e.submit(request("b", vec![500, 600, 700, 800])).unwrap();
    let b_queue = queue_secs(b);
    let a_queues: Vec<f64> = flood.into_iter().map(queue_secs).collect();
    let before_b = a_queues.iter().filter(|&&q| q < b_queue).count();
    // B is admitted at the first free slot after it arrives: at most the A requests running or
    // admitted in the same step go first (one batch, max_seqs = 4), never the whole queue.
    assert!(
        before_b <= 2 * max_seqs,
        "{before_b} of tenant A's 60 queued requests were admitted before tenant B's one"
    );
    common::wait_idle(&e);
}

#[test]
fn another_tenants_request_shares_the_steps_of_long_prompts_in_prefill() {
    let e = common::engine(
        &common::smollm2(),
        EngineConfig {
            scheduler: SchedulerConfig {
                max_batch_tokens: 64,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    // Tenant A: four 1,200-token prompts, each 19 64-token steps of prefill on its own.
    let long = |i: u32| {
        (0..1200)
            .map(|j| 1000 + (i * 7 + j) % 3000)
            .collect::<Vec<u32>>()
    };
    let a: Vec<_> = (0..4)
        .map(|i| e.submit(request("a", long(i))).unwrap())
        .collect();
    assert!(
        matches!(a[0].recv(), Ok(Event::Admitted { .. })),
        "A's first request is admitted"
    );
    // B arrives while A's first prompt is in prefill. Before, A's running prompts took the whole
    // step budget, and B waited until the first of them had been computed; now B's prompt takes
    // its weighted slice of the next step and B decodes alongside A's prefill chunks.
    let b = e.submit(request("b", vec![500, 600, 700, 800])).unwrap();
    let mut b_done = false;
    for ev in b.iter() {
        if let Event::Finished { .. } = ev {
            b_done = true;
            break;
        }
    }
    assert!(b_done, "B finished");
    let a_tokens = a[0]
        .try_iter()
        .filter(|ev| matches!(ev, Event::Token(_)))
        .count();
    assert!(
        a_tokens == 0,
        "A's first request had {a_tokens} tokens when B finished: B's 8 tokens came after A's first prompt finished its prefill: B was held out of the steps"
    );
    drop(a);
    common::wait_idle(&e);
}
