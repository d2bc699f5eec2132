//! Fixtures shared by the in-process benches and `tests/allocations.rs` (which includes this
//! file by path): the configs, a limiter over the memory store at a fixed time, and requests as
//! Envoy's filter sends them. Not every user needs every item.
#![allow(dead_code, clippy::expect_used)]

use std::sync::Arc;

use smallvec::SmallVec;

use sluice::access::AccessList;
use sluice::algorithms::Hits;
use sluice::clock::{ManualClock, Timestamp};
use sluice::config;
use sluice::limiter::{Descriptor, Limiter, Request};
use sluice::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use sluice::stats::Stats;
use sluice::store::{MemoryStore, MemoryStoreOptions};

#[path = "../../tests/common/proto.rs"]
mod proto;

/// 2026-01-01T00:00:00Z plus 30 s: mid-window, so sliding windows weigh a previous window.
pub const NOW_SECS: u64 = 1_767_225_600 + 30;

/// The load config of scripts/bench: domain `load`, endpoint `/bench`, 4e9/minute per client.
pub const LOAD_YAML: &str = include_str!("../load.yaml");
/// The repository's default config (training and Talk2Me).
pub const DEFAULT_YAML: &str = include_str!("../../config/sluice.yaml");

/// [`DEFAULT_YAML`] without Talk2Me's `auto_block` stanza: the `/transcribe` benches measure its
/// five limits, and a client hammering one address at a fixed time would soon be blocked.
pub fn default_yaml_without_auto_block() -> String {
    let mut out = String::with_capacity(DEFAULT_YAML.len());
    let mut skipping = false;
    for line in DEFAULT_YAML.lines() {
        if line.trim_end() == "    auto_block:" {
            skipping = true;
            continue;
        }
        if skipping && line.starts_with("      ") {
            continue;
        }
        skipping = false;
        out.push_str(line);
        out.push('\n');
    }
    assert!(
        out.len() < DEFAULT_YAML.len(),
        "config/sluice.yaml has an auto_block stanza"
    );
    out
}

/// Same domain as `load.yaml` with a limit a hot key exhausts at once: every decision denies.
pub const DENY_YAML: &str = "
domains:
  - name: load
    client: [remote_address]
    endpoints:
      - path: /bench
        limits: [10/minute]
";

/// Resolves a future that must be ready at once (every `MemoryStore` call is), pinned and
/// polled where it is made, with a waker that does nothing: benches measure the decision, not
/// an executor. A decision's future is ~1.5 KB, and handing it to a function by value copied
/// all of it on every call.
macro_rules! ready {
    ($future:expr) => {
        match std::future::Future::poll(
            std::pin::pin!($future),
            &mut std::task::Context::from_waker(std::task::Waker::noop()),
        ) {
            std::task::Poll::Ready(out) => out,
            std::task::Poll::Pending => panic!("a MemoryStore decision never waits"),
        }
    };
}
pub(crate) use ready;

/// A limiter from `yaml` over a memory store of `max_keys` (default: the config's), its clock
/// at [`NOW_SECS`].
pub fn limiter(yaml: &str, max_keys: Option<usize>) -> Limiter<MemoryStore> {
    build(yaml, max_keys, Arc::new(Stats::default()))
}

/// [`limiter`] counting into `stats`: several limiters, one set of statistics.
pub fn limiter_sharing_stats(yaml: &str, stats: Arc<Stats>) -> Limiter<MemoryStore> {
    build(yaml, None, stats)
}

fn build(yaml: &str, max_keys: Option<usize>, stats: Arc<Stats>) -> Limiter<MemoryStore> {
    let cfg = config::parse(yaml, "bench.yaml", |_| None).expect("bench config is valid");
    let store = MemoryStore::new(MemoryStoreOptions {
        max_keys: max_keys.unwrap_or(cfg.store.max_keys),
    });
    Limiter::with_parts(
        cfg.rules,
        store,
        Arc::new(ManualClock::new(Timestamp::from_secs(NOW_SECS))),
        Arc::new(AccessList::empty()),
        stats,
    )
}

/// The request Envoy's filter sends: one descriptor of `(key, value)` entries, hits 1.
///
/// Built in place and moved once, as `service::rls::to_request` builds it: built as a
/// literal (`smallvec![Descriptor { .. }]`), its ~380 bytes were copied three times, and those
/// copies were ~20% of `decide/hot_allowed`'s time (perf, 2026-12-01).
#[inline]
pub fn request<'a>(domain: &'a str, entries: &[(&'a str, &'a str)]) -> Request<'a> {
    let mut r = Request {
        domain,
        descriptors: SmallVec::new(),
    };
    r.descriptors.push(Descriptor {
        entries: SmallVec::new(),
        hits: Hits::Take(1),
        limit_override: None,
    });
    if let Some(d) = r.descriptors.first_mut() {
        d.entries.extend(entries.iter().copied());
    }
    r
}

/// The same request as the generated protobuf message.
pub fn proto_request(domain: &str, entries: &[(&str, &str)]) -> RateLimitRequest {
    proto::request(domain, vec![proto::descriptor(entries)])
}
