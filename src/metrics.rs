//! Prometheus text exposition of sluice's counters, rendered on demand from the same atomics the
//! admin API reads (nothing extra on the request path but the latency histogram).
//!
//! Labels are domain, endpoint and limit names from the config: bounded by the config, never by
//! clients, so cardinality cannot explode with traffic.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::limiter::Limiter;
use crate::stats::LATENCY_BUCKETS;
use crate::store::Store;

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric.
pub fn render<S: Store>(limiter: &Limiter<S>) -> String {
    let stats = limiter.stats();
    let rules = limiter.rules();
    let now = limiter.clock().now();
    let mut out = String::with_capacity(8 * 1024);

    let all = stats.all_counts();
    family(
        &mut out,
        "sluice_decisions_total",
        "counter",
        "Descriptor decisions per endpoint (endpoint \"global\" for domain-wide limits) by code.",
    );
    for (d, e, c) in all.iter().filter(|(_, e, _)| !e.is_empty()) {
        let (d, e) = (esc(d), esc(e));
        let _ = writeln!(
            out,
            "sluice_decisions_total{{domain=\"{d}\",endpoint=\"{e}\",code=\"ok\"}} {}",
            c.allowed
        );
        let _ = writeln!(
            out,
            "sluice_decisions_total{{domain=\"{d}\",endpoint=\"{e}\",code=\"over_limit\"}} {}",
            c.limited
        );
    }
    family(
        &mut out,
        "sluice_near_limit_total",
        "counter",
        "Descriptor decisions admitted with 20% or less of a limit left.",
    );
    for (d, e, c) in all.iter().filter(|(_, e, _)| !e.is_empty()) {
        let _ = writeln!(
            out,
            "sluice_near_limit_total{{domain=\"{}\",endpoint=\"{}\"}} {}",
            esc(d),
            esc(e),
            c.near_limit
        );
    }
    family(
        &mut out,
        "sluice_requests_total",
        "counter",
        "Requests per domain by outcome (ok, over_limit, blocked).",
    );
    for (d, _, c) in all.iter().filter(|(_, e, _)| e.is_empty()) {
        let d = esc(d);
        let _ = writeln!(
            out,
            "sluice_requests_total{{domain=\"{d}\",code=\"ok\"}} {}",
            c.allowed
        );
        let _ = writeln!(
            out,
            "sluice_requests_total{{domain=\"{d}\",code=\"over_limit\"}} {}",
            c.limited
        );
        let _ = writeln!(
            out,
            "sluice_requests_total{{domain=\"{d}\",code=\"blocked\"}} {}",
            c.blocked
        );
    }
    family(
        &mut out,
        "sluice_blocked_total",
        "counter",
        "Requests turned away because their address is blocked (all domains).",
    );
    let _ = writeln!(
        out,
        "sluice_blocked_total {}",
        stats.total.snapshot().blocked
    );

    let limits = stats.all_limit_counts();
    family(
        &mut out,
        "sluice_over_limit_total",
        "counter",
        "Descriptor rejections by the limit that decided them.",
    );
    for (d, e, l, over, _) in &limits {
        let _ = writeln!(
            out,
            "sluice_over_limit_total{{domain=\"{}\",endpoint=\"{}\",limit=\"{}\"}} {over}",
            esc(d),
            esc(e),
            esc(l)
        );
    }
    family(
        &mut out,
        "sluice_shadow_over_limit_total",
        "counter",
        "Descriptors a shadow (or disabled) limit would have rejected.",
    );
    for (d, e, l, _, shadow) in &limits {
        let _ = writeln!(
            out,
            "sluice_shadow_over_limit_total{{domain=\"{}\",endpoint=\"{}\",limit=\"{}\"}} {shadow}",
            esc(d),
            esc(e),
            esc(l)
        );
    }

    family(
        &mut out,
        "sluice_automatic_blocks_total",
        "counter",
        "Automatic blocks created.",
    );
    let _ = writeln!(
        out,
        "sluice_automatic_blocks_total {}",
        stats.automatic_blocks.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "sluice_active_blocks",
        "gauge",
        "Blocks in force.",
    );
    let _ = writeln!(
        out,
        "sluice_active_blocks {}",
        limiter.access().active_blocks_at(now)
    );
    family(
        &mut out,
        "sluice_tracked_keys",
        "gauge",
        "Counters held by the store.",
    );
    let _ = writeln!(
        out,
        "sluice_tracked_keys {}",
        limiter.store().tracked_keys()
    );
    family(
        &mut out,
        "sluice_tracked_clients",
        "gauge",
        "Clients with individual statistics.",
    );
    let _ = writeln!(out, "sluice_tracked_clients {}", stats.tracked_clients());
    family(
        &mut out,
        "sluice_store_errors_total",
        "counter",
        "Decisions answered by the failure policy because the store failed.",
    );
    let _ = writeln!(out, "sluice_store_errors_total {}", limiter.store_errors());

    family(
        &mut out,
        "sluice_decision_duration_seconds",
        "histogram",
        "Time from receiving ShouldRateLimit to having its response.",
    );
    let (buckets, count, sum) = stats.latency.snapshot();
    for (le, n) in LATENCY_BUCKETS.iter().zip(buckets) {
        let _ = writeln!(
            out,
            "sluice_decision_duration_seconds_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "sluice_decision_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(out, "sluice_decision_duration_seconds_sum {sum}");
    let _ = writeln!(out, "sluice_decision_duration_seconds_count {count}");

    family(
        &mut out,
        "sluice_config_reloads_total",
        "counter",
        "Config reloads by result.",
    );
    let _ = writeln!(
        out,
        "sluice_config_reloads_total{{result=\"ok\"}} {}",
        stats.reloads_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "sluice_config_reloads_total{{result=\"failed\"}} {}",
        stats.reloads_failed.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "sluice_config_generation",
        "gauge",
        "1 at start, +1 for every reload that changed the config.",
    );
    let _ = writeln!(
        out,
        "sluice_config_generation {}",
        stats.config_generation.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "sluice_config_info",
        "gauge",
        "The config in force: its hash, whether enforcing.",
    );
    let _ = writeln!(
        out,
        "sluice_config_info{{hash=\"{:016x}\",enabled=\"{}\",shadow=\"{}\"}} 1",
        rules.source_hash, rules.enabled, rules.shadow
    );
    out
}
