//! The router's cascade over a request's update stream. The cheapest model of the group generates
//! first; its first `probe_tokens` tokens of every choice are held back while their doubt signal
//! is read. Then either the held tokens are released and the model goes on (keep), or the next
//! model is started on the same request from the start and the cheaper attempt is stopped, its
//! text dropped and its device time carried into the answer's (escalate). A client never sees text
//! that is later replaced, and an escalated answer is exactly the larger model's own.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::stream::{self, BoxStream, StreamExt};
use opentelemetry::KeyValue;

use super::error::ApiError;
use super::generate::{start, ChoiceEvent, Spec, Update};
use crate::engine::{DeviceTime, EngineHandle, StopHandle};
use crate::router::{Decision, Group, LoadEstimate, Probe, Signals};
use crate::telemetry::names;

/// The models a routed request may escalate to, each with the prompts in its own tokens.
#[derive(Clone)]
pub struct RoutePlan {
    pub group: Group,
    pub next: Vec<(EngineHandle, Vec<Vec<u32>>)>,
    /// Why the model was picked before any generation, when nothing is left to decide (a rule,
    /// the load check, or a policy without the cascade).
    pub picked: Option<String>,
    /// The load check's estimates.
    pub load: Vec<LoadEstimate>,
    /// Tokens per choice through which doubt is read window by window (the group's
    /// `watch_tokens` for a response not streamed; 0 for a stream, whose first window is sent).
    pub watch: usize,
}

/// The stop handles of whatever attempt is running now; once stopped (the client left), no new
/// attempt starts.
#[derive(Clone, Default)]
pub struct StopSet(Arc<Mutex<(Vec<StopHandle>, bool)>>);

impl StopSet {
    pub fn new(stops: Vec<StopHandle>) -> Self {
        Self(Arc::new(Mutex::new((stops, false))))
    }

    pub fn stop_all(&self) {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        g.1 = true;
        g.0.iter().for_each(StopHandle::stop);
    }

    fn is_stopped(&self) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).1
    }

    /// Swap in a new attempt's handles and return the old ones. After `stop_all` the new attempt
    /// is stopped at once (and nothing is returned: the old ones were stopped then).
    fn swap(&self, stops: Vec<StopHandle>) -> Vec<StopHandle> {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if g.1 {
            stops.iter().for_each(StopHandle::stop);
            return Vec::new();
        }
        std::mem::replace(&mut g.0, stops)
    }
}

struct Cascade {
    spec: Spec,
    group: Group,
    rest: VecDeque<(EngineHandle, Vec<Vec<u32>>)>,
    tried: Vec<String>,
    current: BoxStream<'static, Update>,
    stops: StopSet,
    choices: usize,
    /// While deciding: the updates held back. None once decided.
    held: Option<Vec<Update>>,
    probes: Vec<Probe>,
    /// Per choice: probed tokens, and whether it finished.
    probed: Vec<usize>,
    finished: Vec<bool>,
    /// Per choice: device time of the attempts set aside (charged to the answer: it was spent).
    carried: Vec<DeviceTime>,
    escalated_at: Option<usize>,
    load: Vec<LoadEstimate>,
    watch: usize,
    /// Tokens per choice of the current attempt whose windows were read and found confident.
    checked: usize,
    out: VecDeque<Update>,
}

/// Start a routed request on its group's first model (`engine`, `prompts`) and return its update
/// stream: a `Routed` decision first, then the answering model's updates.
pub(super) fn run(
    spec: Spec,
    plan: RoutePlan,
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
) -> Result<(BoxStream<'static, Update>, StopSet), ApiError> {
    let deciding = !plan.next.is_empty();
    let picked = plan.picked;
    let probe = if deciding {
        plan.group.probe_tokens.max(plan.watch)
    } else {
        0
    };
    let (current, stops) = start(&spec, engine, prompts, probe)?;
    let choices = prompts.len() * spec.n();
    let stops = StopSet::new(stops);
    let mut c = Cascade {
        spec,
        rest: plan.next.into(),
        tried: vec![engine.name.clone()],
        current,
        stops: stops.clone(),
        choices,
        held: deciding.then(Vec::new),
        probes: Vec::new(),
        probed: vec![0; choices],
        finished: vec![false; choices],
        carried: vec![DeviceTime::default(); choices],
        escalated_at: None,
        load: plan.load,
        watch: plan.watch,
        checked: 0,
        out: VecDeque::new(),
        group: plan.group,
    };
    if !deciding {
        c.decided(picked.as_deref().unwrap_or("last_model"), None);
    }
    let updates = stream::unfold(c, |mut c| async move { c.next().await.map(|u| (u, c)) });
    Ok((updates.boxed(), stops))
}

impl Cascade {
    async fn next(&mut self) -> Option<Update> {
        loop {
            if let Some(u) = self.out.pop_front() {
                return Some(u);
            }
            let mut u = self.current.next().await?;
            let Some(held) = self.held.as_mut() else {
                self.carry(&mut u);
                return Some(u);
            };
            match &u.event {
                ChoiceEvent::Text { probe: Some(p), .. } => {
                    self.probes.push(*p);
                    self.probed[u.choice] += 1;
                }
                ChoiceEvent::Finished { .. } => self.finished[u.choice] = true,
                ChoiceEvent::Failed(_) => {
                    // A fault ends the request: no decision to wait for.
                    self.decided("failed", None);
                    self.out.push_back(u);
                    continue;
                }
                _ => {}
            }
            held.push(u);
            let window_end = self.checked + self.group.probe_tokens;
            let ready = (0..self.choices).all(|i| self.finished[i] || self.probed[i] >= window_end);
            if ready {
                self.decide().await;
            }
        }
    }

    /// Every choice has its window of probe tokens (or finished): keep this model, read on (while
    /// watching), or escalate.
    async fn decide(&mut self) {
        let t0 = thread_cpu_secs();
        let group = self.group.name.clone();
        let overhead = move |t1: f64| {
            metrics::histogram!(names::ROUTER_DECISION_SECONDS, "route" => group)
                .record((t1 - t0).max(0.0));
        };
        let signals = Signals::of(&self.probes);
        let doubt = match &signals {
            Some(s) => s.doubt(&self.group.thresholds),
            // Nothing new since a confident window: every choice ended on its boundary.
            None if self.checked > 0 => None,
            None => Some("no_tokens"),
        };
        let Some(reason) = doubt else {
            self.checked += self.group.probe_tokens;
            let all_done = self.finished.iter().all(|f| *f);
            if self.checked < self.watch && !all_done {
                // Nothing has reached the client: read the next window before releasing any.
                self.probes.clear();
                overhead(thread_cpu_secs());
                return;
            }
            self.decided("confident", signals);
            overhead(thread_cpu_secs());
            return;
        };
        if self.stops.is_stopped() {
            self.decided(reason, signals);
            return;
        }
        let Some((engine, prompts)) = self.rest.pop_front() else {
            self.decided(reason, signals);
            overhead(thread_cpu_secs());
            return;
        };
        let probe = if self.rest.is_empty() {
            0
        } else {
            self.group.probe_tokens.max(self.watch)
        };
        let from = self.tried.last().cloned().unwrap_or_default();
        let at_token = self.probed.iter().copied().max();
        let span = self
            .spec
            .trace()
            .open("escalate", None, std::time::Instant::now(), || {
                vec![
                    KeyValue::new("hearth.route.from", from.clone()),
                    KeyValue::new("hearth.route.to", engine.name.clone()),
                    KeyValue::new("hearth.route.reason", reason),
                    KeyValue::new(
                        "hearth.route.escalated_at_token",
                        at_token.unwrap_or(0) as i64,
                    ),
                ]
            });
        // The next model starts before this one stops, so a refusal (its queue is full) leaves the
        // cheaper answer standing.
        let (next, stops) = match start(&self.spec.under(span), &engine, &prompts, probe) {
            Ok(s) => s,
            Err(e) => {
                self.spec
                    .trace()
                    .close(span, std::time::Instant::now(), || {
                        vec![KeyValue::new(
                            "hearth.escalation.refused",
                            e.message.clone(),
                        )]
                    });
                tracing::warn!(model = %engine.name, error = %e.message, "escalation refused; keeping the cheaper answer");
                self.decided("escalation_refused", signals);
                return;
            }
        };
        self.stops.swap(stops).iter().for_each(StopHandle::stop);
        // The router's own work ends here; what follows waits for the cheap model's last step.
        overhead(thread_cpu_secs());
        metrics::counter!(
            names::ROUTER_ESCALATIONS,
            "route" => self.group.name.clone(),
            "from" => self.tried.last().cloned().unwrap_or_default(),
            "to" => engine.name.clone(),
            "reason" => reason
        )
        .increment(1);
        if self.escalated_at.is_none() {
            self.escalated_at = at_token;
        }
        // Drop the cheaper attempt's text; keep the device time it used (its choices' finishes,
        // held or still to come once it sees the stop).
        let held = self.held.take().unwrap_or_default();
        let old = std::mem::replace(&mut self.current, next);
        let finishes = stream::iter(held).chain(old);
        let mut finishes = std::pin::pin!(finishes);
        while let Some(u) = finishes.next().await {
            if let ChoiceEvent::Finished { usage, .. } = u.event {
                self.carried[u.choice] += usage.device;
            }
        }
        self.tried.push(engine.name.clone());
        self.probes.clear();
        self.checked = 0;
        self.probed.iter_mut().for_each(|p| *p = 0);
        self.finished.iter_mut().for_each(|f| *f = false);
        if self.rest.is_empty() {
            self.decided(reason, signals);
        } else {
            self.held = Some(Vec::new());
        }
    }

    /// A finish also bills the device time of its choice's attempts set aside.
    fn carry(&self, u: &mut Update) {
        if let ChoiceEvent::Finished { usage, .. } = &mut u.event {
            usage.device += self.carried[u.choice];
        }
    }

    /// Decided: the decision goes out first, then the held updates, then the rest as they come.
    fn decided(&mut self, reason: &str, signals: Option<Signals>) {
        let model = self.tried.last().cloned().unwrap_or_default();
        let decision = Decision {
            group: self.group.name.clone(),
            policy: self.group.policy,
            model,
            tried: self.tried.clone(),
            escalated: self.tried.len() > 1,
            escalated_at_token: self.escalated_at,
            reason: reason.into(),
            signals,
            thresholds: self.group.thresholds,
            load: self.load.clone(),
        };
        metrics::counter!(
            names::ROUTER_DECISIONS,
            "route" => decision.group.clone(),
            "model" => decision.model.clone(),
            "reason" => decision.reason.clone()
        )
        .increment(1);
        self.out.push_back(Update {
            choice: 0,
            event: ChoiceEvent::Routed(Box::new(decision)),
        });
        let held = self.held.take().unwrap_or_default();
        for mut u in held {
            self.carry(&mut u);
            self.out.push_back(u);
        }
    }
}

/// CPU time of the calling thread, in seconds. The decision runs on one thread without yielding, so
/// this is its work; wall time would add whatever the OS gave the engines meanwhile (on a busy
/// two-core machine, milliseconds).
#[cfg(unix)]
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant the OS defines.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(not(unix))]
fn thread_cpu_secs() -> f64 {
    0.0
}
