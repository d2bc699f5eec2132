//! What the quota streams are doing, for `GetStats` and `/metrics`: streams open, their
//! buckets, each bucket's assignment and reported usage. Each stream replaces its own view once
//! per report (every 5 s); nothing here is on a request path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::assignment::Assignment;
use crate::clock::Timestamp;
use crate::store::StoreError;

/// Buckets of a stream shown in statistics: the most demanding.
pub const BUCKETS_SHOWN: usize = 100;

/// Failures of one kind are logged at most this often, seconds.
const LOG_EVERY_SECS: u64 = 10;

/// One bucket as statistics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketView {
    /// The bucket id's entries, sorted by key.
    pub entries: Vec<(String, String)>,
    /// Requests Envoy reported allowed, since the bucket was first reported on this stream.
    pub allowed: u64,
    /// Requests Envoy reported denied, likewise.
    pub denied: u64,
    /// Recent demand, requests per second.
    pub demand: f64,
    /// What Envoy was last told.
    pub assignment: Assignment,
}

/// One stream as statistics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamView {
    /// The stream's number on this replica.
    pub id: u64,
    /// The Envoy's address.
    pub peer: String,
    /// The stream's domain.
    pub domain: String,
    /// When it opened.
    pub opened: Timestamp,
    /// When it last reported.
    pub updated: Timestamp,
    /// Buckets tracked.
    pub bucket_count: usize,
    /// Reports received.
    pub reports: u64,
    /// The most demanding buckets, at most [`BUCKETS_SHOWN`], most demanding first.
    pub buckets: Vec<BucketView>,
}

/// Quota statistics of one replica.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    open: AtomicU64,
    /// Streams opened since start.
    pub opened: AtomicU64,
    /// Streams refused because [`super::Settings::max_streams`] were open.
    pub refused_streams: AtomicU64,
    /// Reports received.
    pub reports: AtomicU64,
    /// Requests Envoys reported allowed.
    pub reported_allowed: AtomicU64,
    /// Requests Envoys reported denied.
    pub reported_denied: AtomicU64,
    /// Buckets answered untracked because their stream held [`super::Settings::max_buckets`].
    pub refused_buckets: AtomicU64,
    /// Bucket ids answered untracked because they break a descriptor's bounds.
    pub invalid_buckets: AtomicU64,
    /// Buckets abandoned for being idle.
    pub abandoned: AtomicU64,
    /// Ledger calls that failed.
    pub ledger_errors: AtomicU64,
    last_logged: AtomicU64,
    views: Mutex<BTreeMap<u64, StreamView>>,
}

impl Registry {
    /// Counts a stream open and numbers it, unless `max` are open.
    pub(super) fn open(&self, max: usize) -> Option<u64> {
        let open = self.open.fetch_add(1, Ordering::Relaxed);
        if open >= max as u64 {
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.refused_streams.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        Some(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Counts stream `id` closed and drops its view.
    pub(super) fn close(&self, id: u64) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.views.lock().remove(&id);
    }

    pub(super) fn update(&self, view: StreamView) {
        self.views.lock().insert(view.id, view);
    }

    pub(super) fn reported(&self, allowed: u64, denied: u64) {
        self.reported_allowed.fetch_add(allowed, Ordering::Relaxed);
        self.reported_denied.fetch_add(denied, Ordering::Relaxed);
    }

    pub(super) fn refused(&self, peer: &str, now: Timestamp) {
        self.refused_buckets.fetch_add(1, Ordering::Relaxed);
        if self.may_log(now) {
            tracing::warn!(%peer, "a quota stream holds its most buckets; further buckets are answered by the failure policy, untracked");
        }
    }

    pub(super) fn invalid(&self, problem: &str, now: Timestamp) {
        self.invalid_buckets.fetch_add(1, Ordering::Relaxed);
        if self.may_log(now) {
            tracing::warn!(%problem, "a quota bucket id breaks a descriptor's bounds; answered by the failure policy, untracked");
        }
    }

    pub(super) fn ledger_error(&self, error: &StoreError, now: Timestamp) {
        self.ledger_errors.fetch_add(1, Ordering::Relaxed);
        if self.may_log(now) {
            tracing::error!(%error, "quota ledger failing; keeping the assignments Envoy has");
        }
    }

    fn may_log(&self, now: Timestamp) -> bool {
        let secs = now.as_secs();
        let last = self.last_logged.load(Ordering::Relaxed);
        (last == 0 || secs >= last.saturating_add(LOG_EVERY_SECS))
            && self
                .last_logged
                .compare_exchange(last, secs.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Streams open.
    pub fn open_streams(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Every stream that has reported, by number.
    pub fn streams(&self) -> Vec<StreamView> {
        self.views.lock().values().cloned().collect()
    }

    /// Per domain: buckets tracked, and the buckets shown per assignment kind with the sum of
    /// their token-bucket rates (tokens per second).
    pub fn by_domain(&self) -> BTreeMap<String, DomainTotals> {
        let mut out: BTreeMap<String, DomainTotals> = BTreeMap::new();
        for v in self.views.lock().values() {
            let d = out.entry(v.domain.clone()).or_default();
            d.buckets += v.bucket_count as u64;
            for b in &v.buckets {
                match b.assignment {
                    Assignment::AllowAll => d.allow_all += 1,
                    Assignment::DenyAll => d.deny_all += 1,
                    Assignment::TokenBucket { .. } => {
                        d.token_buckets += 1;
                        d.assigned_rate += b.assignment.rate();
                    }
                }
            }
        }
        out
    }
}

/// A domain's quota streams, summed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainTotals {
    /// Buckets tracked.
    pub buckets: u64,
    /// Buckets shown assigned ALLOW_ALL.
    pub allow_all: u64,
    /// Buckets shown assigned DENY_ALL.
    pub deny_all: u64,
    /// Buckets shown assigned a token bucket.
    pub token_buckets: u64,
    /// Their rates, summed, tokens per second.
    pub assigned_rate: f64,
}
