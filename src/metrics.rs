//! Prometheus text exposition of sluice's counters, rendered on demand from the same atomics the
//! admin API reads (nothing extra on the request path but the latency histogram).
//!
//! Labels are domain, endpoint and limit names from the config: bounded by the config, never by
//! clients, so cardinality cannot explode with traffic.

use std::fmt::{Display, Write as _};
use std::sync::atomic::Ordering;

use crate::connections::{ConnectionStats, ListenerStats};
use crate::limiter::Limiter;
use crate::stats::LATENCY_BUCKETS;
use crate::store::Store;

/// The exposition being written. Every sample goes through [`Exposition::sample`], so label
/// values are escaped in exactly one place.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                self.0.push_str(k);
                self.0.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.0.push_str("\\\\"),
                        '"' => self.0.push_str("\\\""),
                        '\n' => self.0.push_str("\\n"),
                        c => self.0.push(c),
                    }
                }
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Renders every metric.
pub fn render<S: Store>(limiter: &Limiter<S>, listeners: &ListenerStats) -> String {
    let stats = limiter.stats();
    let rules = limiter.rules();
    let now = limiter.clock().now();
    let mut out = Exposition(String::with_capacity(8 * 1024));

    let all = stats.all_counts();
    let endpoints: Vec<_> = all.iter().filter(|(_, e, _)| !e.is_empty()).collect();
    out.family(
        "sluice_decisions_total",
        "counter",
        "Descriptor decisions per endpoint (endpoint \"global\" for domain-wide limits) by code.",
    );
    for (d, e, c) in &endpoints {
        for (code, n) in [("ok", c.allowed), ("over_limit", c.limited)] {
            let labels = [
                ("domain", d.as_str()),
                ("endpoint", e.as_str()),
                ("code", code),
            ];
            out.sample("sluice_decisions_total", &labels, n);
        }
    }
    out.family(
        "sluice_near_limit_total",
        "counter",
        "Descriptor decisions admitted with 20% or less of a limit left.",
    );
    for (d, e, c) in &endpoints {
        let labels = [("domain", d.as_str()), ("endpoint", e.as_str())];
        out.sample("sluice_near_limit_total", &labels, c.near_limit);
    }
    out.family(
        "sluice_requests_total",
        "counter",
        "Requests per domain by outcome (ok, over_limit, blocked).",
    );
    for (d, _, c) in all.iter().filter(|(_, e, _)| e.is_empty()) {
        for (code, n) in [
            ("ok", c.allowed),
            ("over_limit", c.limited),
            ("blocked", c.blocked),
        ] {
            out.sample("sluice_requests_total", &[("domain", d), ("code", code)], n);
        }
    }
    out.single(
        "sluice_blocked_total",
        "counter",
        "Requests turned away because their address is blocked (all domains).",
        stats.total.snapshot().blocked,
    );

    let limits = stats.all_limit_counts();
    out.family(
        "sluice_over_limit_total",
        "counter",
        "Descriptor rejections by the limit that decided them.",
    );
    for (d, e, l, over, _) in &limits {
        let labels = [
            ("domain", d.as_str()),
            ("endpoint", e.as_str()),
            ("limit", l.as_str()),
        ];
        out.sample("sluice_over_limit_total", &labels, over);
    }
    out.family(
        "sluice_shadow_over_limit_total",
        "counter",
        "Descriptors a shadow (or disabled) limit would have rejected.",
    );
    for (d, e, l, _, shadow) in &limits {
        let labels = [
            ("domain", d.as_str()),
            ("endpoint", e.as_str()),
            ("limit", l.as_str()),
        ];
        out.sample("sluice_shadow_over_limit_total", &labels, shadow);
    }

    out.single(
        "sluice_automatic_blocks_total",
        "counter",
        "Automatic blocks created.",
        stats.automatic_blocks.load(Ordering::Relaxed),
    );
    out.single(
        "sluice_active_blocks",
        "gauge",
        "Blocks in force.",
        limiter.access().active_blocks_at(now),
    );
    out.single(
        "sluice_tracked_keys",
        "gauge",
        "Counters held by the store.",
        limiter.store().tracked_keys(),
    );
    out.single(
        "sluice_tracked_clients",
        "gauge",
        "Clients with individual statistics.",
        stats.tracked_clients(),
    );
    out.single(
        "sluice_store_evictions_total",
        "counter",
        "Live counters dropped because the store was full (max_keys): those clients started afresh.",
        limiter.store().evictions(),
    );
    out.single(
        "sluice_store_over_limit_cache_hits_total",
        "counter",
        "Charges denied from the Redis store's local over-limit cache without a round trip.",
        limiter.store().cache_hits(),
    );
    out.single(
        "sluice_store_errors_total",
        "counter",
        "Decisions answered by the failure policy because the store failed.",
        limiter.store_errors(),
    );

    out.family(
        "sluice_decision_duration_seconds",
        "histogram",
        "Time from receiving ShouldRateLimit to having its response.",
    );
    let (buckets, count, sum) = stats.latency.snapshot();
    for (le, n) in LATENCY_BUCKETS.iter().zip(buckets) {
        let le = le.to_string();
        out.sample("sluice_decision_duration_seconds_bucket", &[("le", &le)], n);
    }
    out.sample(
        "sluice_decision_duration_seconds_bucket",
        &[("le", "+Inf")],
        count,
    );
    out.sample("sluice_decision_duration_seconds_sum", &[], sum);
    out.sample("sluice_decision_duration_seconds_count", &[], count);

    out.family(
        "sluice_config_reloads_total",
        "counter",
        "Config reloads by result.",
    );
    for (result, n) in [("ok", &stats.reloads_ok), ("failed", &stats.reloads_failed)] {
        let n = n.load(Ordering::Relaxed);
        out.sample("sluice_config_reloads_total", &[("result", result)], n);
    }
    out.single(
        "sluice_config_generation",
        "gauge",
        "1 at start, +1 for every reload that changed the config.",
        stats.config_generation.load(Ordering::Relaxed),
    );
    out.family(
        "sluice_config_info",
        "gauge",
        "The config in force: its hash, whether enforcing.",
    );
    let hash = format!("{:016x}", rules.source_hash);
    let (enabled, shadow) = (rules.enabled.to_string(), rules.shadow.to_string());
    let labels = [
        ("hash", hash.as_str()),
        ("enabled", &enabled),
        ("shadow", &shadow),
    ];
    out.sample("sluice_config_info", &labels, 1);
    connections(&mut out, listeners);
    out.0
}

/// The gRPC listeners' connections (`listener` is `decisions` or `admin`).
fn connections(out: &mut Exposition, listeners: &ListenerStats) {
    let both = [
        ("decisions", &listeners.decisions),
        ("admin", &listeners.admin),
    ];
    type Family = (
        &'static str,
        &'static str,
        &'static str,
        fn(&ConnectionStats) -> u64,
    );
    let families: [Family; 3] = [
        (
            "sluice_connections_accepted_total",
            "counter",
            "Connections accepted and served.",
            ConnectionStats::accepted,
        ),
        (
            "sluice_connections_refused_total",
            "counter",
            "Connections closed as they arrived because the listener's max_connections were open.",
            ConnectionStats::refused,
        ),
        (
            "sluice_connections_open",
            "gauge",
            "Connections open now.",
            |s| s.open() as u64,
        ),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        for (listener, stats) in both {
            out.sample(name, &[("listener", listener)], value(stats));
        }
    }
    out.family(
        "sluice_connections_closed_total",
        "counter",
        "Connections the server closed: HTTP/2 not started within the handshake timeout, or no call within the idle timeout.",
    );
    for (listener, stats) in both {
        for (reason, n) in [
            ("handshake_timeout", stats.handshake_timeouts()),
            ("idle", stats.idle_closed()),
        ] {
            let labels = [("listener", listener), ("reason", reason)];
            out.sample("sluice_connections_closed_total", &labels, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition(String::new());
        out.sample("m", &[("a", "x\"y\\z\nw"), ("b", "/p")], 3);
        assert_eq!(out.0, "m{a=\"x\\\"y\\\\z\\nw\",b=\"/p\"} 3\n");
    }
}
