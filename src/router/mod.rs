//! Route groups: a request that names a group in `model` (by default `auto`) gets a model picked for
//! it. The cascade policy runs the cheapest model first, reads how sure it was of its first tokens
//! (`signals`), and keeps its answer or escalates to the next model, which answers from the start.
//! Decisions are data (`Decision`): they travel with the response, the metrics and the ledger.
pub mod load;
pub mod signals;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{HearthError, Result};
pub use load::LoadEstimate;
pub use signals::{Probe, Signals, Thresholds};

/// The group that exists without any `[[routes]]` in the config.
pub const DEFAULT_GROUP: &str = "auto";

/// Tokens the cheaper model generates before the cascade decides (RouteLLM-style routers see none;
/// a few are enough to read the model's own confidence, and cheap to throw away).
pub const DEFAULT_PROBE_TOKENS: usize = 8;

fn default_probe_tokens() -> usize {
    DEFAULT_PROBE_TOKENS
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// The models to pick from, cheapest first.
    pub models: Vec<String>,
    #[serde(default)]
    pub policy: Policy,
    /// Tokens the cheaper model generates before the keep-or-escalate decision.
    #[serde(default = "default_probe_tokens")]
    pub probe_tokens: usize,
    /// Escalate when a signal falls below its threshold.
    #[serde(default)]
    pub escalate_below: Thresholds,
    /// Checked in order before the cascade: the first rule a request matches picks its model.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// The load policy's target: a model whose queue would delay the first token past this many
    /// milliseconds is skipped (unset: no load check; `policy = "load"` needs it, `"rules"`
    /// ignores it).
    pub ttft_target_ms: Option<u64>,
    /// For responses not streamed (nothing reaches the client before the end): keep reading the
    /// cheaper model's doubt, window by window of `probe_tokens`, through this many tokens, and
    /// escalate at the first doubtful window (0: decide once, after the first window).
    #[serde(default)]
    pub watch_tokens: usize,
    /// This route's response-cache settings, over the global `[cache]`.
    #[serde(default)]
    pub cache: Option<crate::cache::CacheSettings>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            models: Vec::new(),
            policy: Policy::default(),
            probe_tokens: DEFAULT_PROBE_TOKENS,
            escalate_below: Thresholds::default(),
            rules: Vec::new(),
            ttft_target_ms: None,
            watch_tokens: 0,
            cache: None,
        }
    }
}

/// A request matches when every condition given holds.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The group's model that answers a matching request.
    pub model: String,
    /// The caller's tenant.
    pub tenant: Option<String>,
    /// Prompt tokens (in the group's first model's tokens), at least / at most.
    pub min_prompt_tokens: Option<usize>,
    pub max_prompt_tokens: Option<usize>,
    /// A regular expression found in the last user message (chat) or the prompt (completions).
    pub pattern: Option<String>,
}

/// A rule with its pattern compiled.
#[derive(Debug, Clone)]
pub struct Rule {
    pub config: RuleConfig,
    pattern: Option<regex::Regex>,
}

impl Rule {
    fn new(config: &RuleConfig) -> Result<Self> {
        let pattern = config
            .pattern
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .map_err(|e| HearthError::Config(format!("route rule pattern: {e}")))?;
        Ok(Self {
            config: config.clone(),
            pattern,
        })
    }

    fn matches(&self, tenant: &str, text: &str, prompt_tokens: usize) -> bool {
        let c = &self.config;
        c.tenant.as_deref().is_none_or(|t| t == tenant)
            && c.min_prompt_tokens.is_none_or(|m| prompt_tokens >= m)
            && c.max_prompt_tokens.is_none_or(|m| prompt_tokens <= m)
            && self.pattern.as_ref().is_none_or(|p| p.is_match(text))
    }
}

/// How far down the chain rules -> load -> cascade a group goes; each policy includes the ones
/// before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Rules, then the group's first model.
    Rules,
    /// Rules, then the cheapest model whose queue meets the TTFT target.
    Load,
    /// Rules, the load check (when a target is set), then cheapest model first, escalating on
    /// doubt.
    #[default]
    Cascade,
}

/// A route group, resolved against the served models.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    /// Cheapest first.
    pub models: Vec<String>,
    pub policy: Policy,
    pub probe_tokens: usize,
    pub thresholds: Thresholds,
    pub rules: Vec<Rule>,
    pub ttft_target: Option<std::time::Duration>,
    pub watch_tokens: usize,
}

impl Group {
    /// The first rule the request matches: its index and model.
    pub fn rule_for(
        &self,
        tenant: &str,
        text: &str,
        prompt_tokens: usize,
    ) -> Option<(usize, &str)> {
        self.rules
            .iter()
            .position(|r| r.matches(tenant, text, prompt_tokens))
            .map(|i| (i, self.rules[i].config.model.as_str()))
    }
}

/// Every route group of the server.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    groups: Vec<Group>,
}

impl Routes {
    /// Check the configured groups against the served model names: an unknown model, an empty or
    /// duplicate group, or a group named like a model is a config error (at start-up, not at
    /// request time).
    pub fn check(routes: &[RouteConfig], served: &[&str]) -> Result<()> {
        let bad = |m: String| Err(HearthError::Config(m));
        for (i, r) in routes.iter().enumerate() {
            if r.name.is_empty() || served.contains(&r.name.as_str()) {
                return bad(format!(
                    "route `{}`: a route needs a name that is not a model's",
                    r.name
                ));
            }
            if routes[..i].iter().any(|o| o.name == r.name) {
                return bad(format!("route `{}` is defined twice", r.name));
            }
            if r.models.is_empty() {
                return bad(format!("route `{}` names no models", r.name));
            }
            if let Some(m) = r.models.iter().find(|m| !served.contains(&m.as_str())) {
                return bad(format!(
                    "route `{}` names model `{m}`, which is not served (served: {})",
                    r.name,
                    served.join(", ")
                ));
            }
            if r.policy == Policy::Load && r.ttft_target_ms.is_none() {
                return bad(format!(
                    "route `{}`: policy \"load\" needs ttft_target_ms",
                    r.name
                ));
            }
            if r.probe_tokens == 0 {
                return bad(format!(
                    "route `{}`: probe_tokens must be at least 1",
                    r.name
                ));
            }
            for rule in &r.rules {
                if !r.models.contains(&rule.model) {
                    return bad(format!(
                        "route `{}`: a rule picks `{}`, which is not one of the route's models",
                        r.name, rule.model
                    ));
                }
                Rule::new(rule)?;
            }
        }
        Ok(())
    }

    /// The groups over the loaded models. `served` holds each model's name and its device cost of
    /// one token (the metering cost model's); with no groups configured, `auto` takes every
    /// served model, cheapest first.
    pub fn new(routes: &[RouteConfig], served: &[(String, u128)]) -> Result<Self> {
        let names: Vec<&str> = served.iter().map(|(n, _)| n.as_str()).collect();
        Self::check(routes, &names)?;
        let groups = if routes.is_empty() {
            if served.is_empty() || names.contains(&DEFAULT_GROUP) {
                Vec::new()
            } else {
                let mut by_cost: Vec<&(String, u128)> = served.iter().collect();
                by_cost.sort_by_key(|(_, cost)| *cost);
                vec![Group {
                    name: DEFAULT_GROUP.into(),
                    models: by_cost.into_iter().map(|(n, _)| n.clone()).collect(),
                    policy: Policy::Cascade,
                    probe_tokens: DEFAULT_PROBE_TOKENS,
                    thresholds: Thresholds::default(),
                    rules: Vec::new(),
                    ttft_target: None,
                    watch_tokens: 0,
                }]
            }
        } else {
            routes
                .iter()
                .map(|r| {
                    Ok(Group {
                        name: r.name.clone(),
                        models: r.models.clone(),
                        policy: r.policy,
                        probe_tokens: r.probe_tokens,
                        thresholds: r.escalate_below,
                        rules: r.rules.iter().map(Rule::new).collect::<Result<_>>()?,
                        ttft_target: r.ttft_target_ms.map(std::time::Duration::from_millis),
                        watch_tokens: r.watch_tokens,
                    })
                })
                .collect::<Result<_>>()?
        };
        Ok(Self { groups })
    }

    pub fn get(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }
}

/// What the router did for one request: the response's `metrics.route`, the `x-hearth-route`
/// header and the ledger's route column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Decision {
    /// The route group the request named.
    pub group: String,
    pub policy: Policy,
    /// The model that answered.
    pub model: String,
    /// Every model that generated for the request, in order (the last answered).
    pub tried: Vec<String>,
    pub escalated: bool,
    /// Tokens the cheaper model had generated (per choice, at most) when it was set aside: past
    /// the first window only for a response not streamed, on a route with `watch_tokens`.
    pub escalated_at_token: Option<usize>,
    /// Why the last step went the way it did: `rule_N` (the route's rule N picked the model),
    /// `load` (the load check left one model), `first_model` (policy rules or load, nothing else
    /// to decide), `confident`, `low_logprob`, `low_margin`, `no_tokens` (the cheaper model stopped
    /// at once), `last_model` (nothing to escalate to) or `escalation_refused`.
    pub reason: String,
    /// The load check's estimate for each model it weighed (empty when the group has no TTFT
    /// target or a rule picked the model).
    pub load: Vec<LoadEstimate>,
    /// The cheaper model's signals over the last window read (none when no decision was needed).
    #[schema(value_type = Option<Object>)]
    pub signals: Option<Signals>,
    #[schema(value_type = Object)]
    pub thresholds: Thresholds,
}

impl Decision {
    /// One line for the `x-hearth-route` header and the ledger.
    pub fn summary(&self) -> String {
        let mut s = format!("{}:{}", self.group, self.model);
        if self.escalated {
            s.push_str(&format!(" escalated({})", self.reason));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, models: &[&str]) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            probe_tokens: 4,
            ..Default::default()
        }
    }

    #[test]
    fn auto_orders_the_served_models_cheapest_first() {
        let served = [("large".to_string(), 900), ("small".to_string(), 100)];
        let r = Routes::new(&[], &served).unwrap();
        assert_eq!(r.get("auto").unwrap().models, ["small", "large"]);
        assert!(r.get("large").is_none());
    }

    #[test]
    fn unknown_models_and_clashing_names_are_config_errors() {
        let served = ["small", "large"];
        assert!(Routes::check(&[route("fast", &["small", "large"])], &served).is_ok());
        for bad in [
            vec![route("fast", &["small", "huge"])],
            vec![route("small", &["small"])],
            vec![route("fast", &[])],
            vec![route("fast", &["small"]), route("fast", &["large"])],
            vec![RouteConfig {
                policy: Policy::Load,
                ..route("fast", &["small", "large"])
            }],
            vec![RouteConfig {
                rules: vec![RuleConfig {
                    model: "huge".into(),
                    ..Default::default()
                }],
                ..route("fast", &["small", "large"])
            }],
            vec![RouteConfig {
                rules: vec![RuleConfig {
                    model: "large".into(),
                    pattern: Some("(unclosed".into()),
                    ..Default::default()
                }],
                ..route("fast", &["small", "large"])
            }],
        ] {
            assert!(
                matches!(Routes::check(&bad, &served), Err(HearthError::Config(_))),
                "{bad:?}"
            );
        }
    }
}
