//! Prometheus text exposition of sluice's counters, rendered on demand from the same atomics the
//! admin API reads (nothing extra on the request path but the latency histogram).
//!
//! Labels are domain, endpoint and limit names from the config: bounded by the config, never by
//! clients, so cardinality cannot explode with traffic. The one exception, envoyproxy/ratelimit's
//! per-value statistics keys, is bounded by [`crate::stats::KeyRegistry`], which counts what it
//! folds into its `overflow` key.

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
pub fn render<S: Store>(
    limiter: &Limiter<S>,
    listeners: &ListenerStats,
    quotas: &crate::quota::registry::Registry,
) -> String {
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
        "sluice_automatic_blocks_refused_total",
        "counter",
        "Automatic blocks not made because 100,000 blocks were in force.",
        limiter.access().automatic_blocks_refused(),
    );
    out.single(
        "sluice_active_blocks",
        "gauge",
        "Blocks in force.",
        limiter.access().active_blocks_at(now),
    );
    out.family(
        "sluice_state_sync_errors_total",
        "counter",
        "Failures keeping blocks and the allowlist, by kind: entries in Redis that cannot be decoded or break a bound (skipped), local changes that cannot be encoded for Redis (not shared), replication rounds through Redis that failed (retried), state file writes that failed.",
    );
    for (kind, n) in limiter.access().sync_errors().counts() {
        out.sample("sluice_state_sync_errors_total", &[("kind", kind)], n);
    }
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
        "sluice_clients_untracked_total",
        "counter",
        "Decisions for a client without statistics of its own because stats.max_clients were tracked (counted in the totals only).",
        stats.untracked_clients.load(Ordering::Relaxed),
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
        "sluice_store_over_limit_cache_full_total",
        "counter",
        "Redis refusals not cached because the over-limit cache was full (100,000 keys): their next call asks Redis.",
        limiter.store().cache_full(),
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
    quota_streams(&mut out, quotas);
    if rules.reference.is_some() {
        reference(&mut out, limiter);
    }
    out.0
}

/// RLQS: streams, buckets and assignments per domain (labels: domains Envoys stream for, so
/// at most one per open stream), and what Envoys reported.
fn quota_streams(out: &mut Exposition, q: &crate::quota::registry::Registry) {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    out.family(
        "sluice_rlqs_streams",
        "gauge",
        "Quota streams (StreamRateLimitQuotas) open.",
    );
    out.sample("sluice_rlqs_streams", &[], q.open_streams());
    let by_domain = q.by_domain();
    out.family(
        "sluice_rlqs_buckets",
        "gauge",
        "Quota buckets tracked, per domain, over every open stream.",
    );
    for (d, t) in &by_domain {
        out.sample("sluice_rlqs_buckets", &[("domain", d.as_str())], t.buckets);
    }
    out.family(
        "sluice_rlqs_assignments",
        "gauge",
        "Buckets shown in GetStats (the most demanding 100 per stream) by what they are assigned.",
    );
    for (d, t) in &by_domain {
        for (kind, n) in [
            ("token_bucket", t.token_buckets),
            ("allow_all", t.allow_all),
            ("deny_all", t.deny_all),
        ] {
            out.sample(
                "sluice_rlqs_assignments",
                &[("domain", d.as_str()), ("assignment", kind)],
                n,
            );
        }
    }
    out.family(
        "sluice_rlqs_assigned_rate",
        "gauge",
        "Requests per second those buckets' token buckets admit, summed over streams.",
    );
    for (d, t) in &by_domain {
        out.sample(
            "sluice_rlqs_assigned_rate",
            &[("domain", d.as_str())],
            t.assigned_rate,
        );
    }
    out.family(
        "sluice_rlqs_reported_requests_total",
        "counter",
        "Requests Envoys reported on quota streams, by what Envoy did with them.",
    );
    for (outcome, n) in [
        ("allowed", load(&q.reported_allowed)),
        ("denied", load(&q.reported_denied)),
    ] {
        out.sample(
            "sluice_rlqs_reported_requests_total",
            &[("outcome", outcome)],
            n,
        );
    }
    for (name, help, n) in [
        (
            "sluice_rlqs_streams_opened_total",
            "Quota streams opened.",
            load(&q.opened),
        ),
        (
            "sluice_rlqs_streams_refused_total",
            "Quota streams refused because the most were open.",
            load(&q.refused_streams),
        ),
        (
            "sluice_rlqs_reports_total",
            "Usage reports received.",
            load(&q.reports),
        ),
        (
            "sluice_rlqs_buckets_refused_total",
            "Buckets answered by the failure policy, untracked, because their stream held the most.",
            load(&q.refused_buckets),
        ),
        (
            "sluice_rlqs_buckets_invalid_total",
            "Bucket ids answered by the failure policy, untracked, for breaking a descriptor's bounds.",
            load(&q.invalid_buckets),
        ),
        (
            "sluice_rlqs_buckets_abandoned_total",
            "Idle buckets abandoned.",
            load(&q.abandoned),
        ),
        (
            "sluice_rlqs_ledger_errors_total",
            "Calls to the quota ledger (Redis) that failed.",
            load(&q.ledger_errors),
        ),
    ] {
        out.family(name, "counter", help);
        out.sample(name, &[], n);
    }
}

/// envoyproxy/ratelimit's statistics, under the names and labels its default Prometheus
/// mapping (`src/stats/prom/default_mapper.yaml`) gives them: the stat
/// `ratelimit.service.rate_limit.<domain>.<level1>[.<level2>...].<stat>` becomes
/// `ratelimit_service_rate_limit_<stat>{domain, key1[, key2]}` (deeper levels are dropped, as
/// the mapping's regular expression drops them). `over_limit_with_local_cache`, which the
/// mapping leaves out, follows the same scheme.
fn reference<S: Store>(out: &mut Exposition, limiter: &Limiter<S>) {
    let stats = limiter.stats();
    let keys = stats.keys.snapshot();
    type Pick = fn(&crate::stats::KeyStats) -> &std::sync::atomic::AtomicU64;
    let families: [(&str, &str, Pick); 6] = [
        ("total_hits", "Hits checked against the rule.", |k| {
            &k.total_hits
        }),
        ("over_limit", "Hits over the rule's limit.", |k| {
            &k.over_limit
        }),
        (
            "near_limit",
            "Hits above NEAR_LIMIT_RATIO of the rule's limit.",
            |k| &k.near_limit,
        ),
        ("within_limit", "Hits within the rule's limit.", |k| {
            &k.within_limit
        }),
        (
            "shadow_mode",
            "Hits over the limit of a shadow rule, admitted.",
            |k| &k.shadow_mode,
        ),
        (
            "over_limit_with_local_cache",
            "Hits refused from the local over-limit cache.",
            |k| &k.over_limit_with_local_cache,
        ),
    ];
    let labelled: Vec<(Vec<String>, &std::sync::Arc<crate::stats::KeyStats>)> = keys
        .iter()
        .map(|(k, v)| (sanitize(k).split('.').map(str::to_string).collect(), v))
        .collect();
    for (stat, help, pick) in families {
        let name = format!("ratelimit_service_rate_limit_{stat}");
        out.family(&name, "counter", help);
        for (parts, v) in &labelled {
            let mut labels: Vec<(&str, &str)> = Vec::with_capacity(3);
            for (label, part) in ["domain", "key1", "key2"].iter().zip(parts.iter()) {
                labels.push((label, part));
            }
            out.sample(&name, &labels, pick(v).load(Ordering::Relaxed));
        }
    }
    out.single(
        "ratelimit_service_config_load_success",
        "counter",
        "Config loads that succeeded, the first included.",
        1 + stats.reloads_ok.load(Ordering::Relaxed),
    );
    out.single(
        "ratelimit_service_config_load_error",
        "counter",
        "Config loads refused.",
        stats.reloads_failed.load(Ordering::Relaxed),
    );
    out.single(
        "ratelimit_service_global_shadow_mode",
        "counter",
        "Requests answered OK only because of SHADOW_MODE.",
        limiter
            .reference_counts
            .global_shadow_mode
            .load(Ordering::Relaxed),
    );
    out.single(
        "ratelimit_service_rate_limit_domain_not_found",
        "counter",
        "Requests for a domain with no rules.",
        limiter
            .reference_counts
            .domain_not_found
            .load(Ordering::Relaxed),
    );
    out.single(
        "ratelimit_service_local_cache_hits",
        "counter",
        "Descriptors refused from the local over-limit cache (LOCAL_CACHE_SIZE_IN_BYTES).",
        limiter.local_cache.hits.load(Ordering::Relaxed),
    );
    out.single(
        "sluice_reference_local_cache_full_total",
        "counter",
        "Keys over their limit not cached because LOCAL_CACHE_SIZE_IN_BYTES was full: their next call asks the store.",
        limiter.local_cache.full.load(Ordering::Relaxed),
    );
    out.single(
        "sluice_reference_stat_keys_overflowed_total",
        "counter",
        "Statistics keys counted under key \"overflow\" because the registry was full.",
        stats.keys.overflowed.load(Ordering::Relaxed),
    );
}

/// The reference's `SanitizeStatName`: `:` and `|` become `_`, and so do the dots of IPv4
/// addresses (so an address does not split into levels).
fn sanitize(key: &str) -> String {
    let replaced: String = key
        .chars()
        .map(|c| if c == ':' || c == '|' { '_' } else { c })
        .collect();
    let b = replaced.as_bytes();
    let mut out = String::with_capacity(replaced.len());
    let mut i = 0;
    while i < b.len() {
        if let Some(len) = ipv4_at(&b[i..]) {
            out.push_str(&replaced[i..i + len].replace('.', "_"));
            i += len;
        } else {
            let ch = replaced[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The length of `\d{1,3}(\.\d{1,3}){3}` at the start of `b` (leftmost-first, as Go's
/// regexp), if it matches there.
fn ipv4_at(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    for group in 0..4 {
        if group > 0 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        let start = i;
        while i < b.len() && i - start < 3 && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    Some(i)
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
    tls(out, listeners);
}

/// The TLS of the listeners that have it: certificates reloaded, reloads refused, handshakes
/// failed. A family with no listener on TLS is left out.
fn tls(out: &mut Exposition, listeners: &ListenerStats) {
    let on_tls: Vec<(&str, &crate::tls::TlsListener)> = [
        ("decisions", &listeners.grpc_tls),
        ("admin", &listeners.admin_tls),
    ]
    .into_iter()
    .filter_map(|(name, tls)| Some((name, tls.as_deref()?)))
    .collect();
    if on_tls.is_empty() {
        return;
    }
    type Family = (
        &'static str,
        &'static str,
        fn(&crate::tls::TlsListener) -> u64,
    );
    let families: [Family; 3] = [
        (
            "sluice_tls_reloads_total",
            "New certificates (or keys, or client CAs) installed from changed files since start.",
            crate::tls::TlsListener::reloads,
        ),
        (
            "sluice_tls_reload_failures_total",
            "Changed TLS files that could not be loaded; the previous certificate stayed in use.",
            crate::tls::TlsListener::reload_failures,
        ),
        (
            "sluice_tls_handshake_failures_total",
            "Connections closed because their TLS handshake failed or timed out.",
            crate::tls::TlsListener::handshake_failures,
        ),
    ];
    for (name, help, value) in families {
        out.family(name, "counter", help);
        for (listener, tls) in &on_tls {
            out.sample(name, &[("listener", listener)], value(tls));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_stat_names_are_sanitised_as_the_reference_does() {
        assert_eq!(
            sanitize("d.remote_address_10.0.0.1"),
            "d.remote_address_10_0_0_1"
        );
        assert_eq!(sanitize("d.k_a:b|c"), "d.k_a_b_c");
        assert_eq!(sanitize("d.path_/v1.2/x"), "d.path_/v1.2/x");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition(String::new());
        out.sample("m", &[("a", "x\"y\\z\nw"), ("b", "/p")], 3);
        assert_eq!(out.0, "m{a=\"x\\\"y\\\\z\\nw\",b=\"/p\"} 3\n");
    }
}
