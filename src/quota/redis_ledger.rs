//! The quota ledger in Redis, shared by every replica of one store.

use super::ledger::{Claim, Claimant, Grant, Ledger, Totals};
use crate::clock::Timestamp;
use crate::store::redis::RedisHandle;
use crate::store::{CounterKey, StoreError};

/// The ledger every replica of one Redis store shares.
#[derive(Debug)]
pub struct RedisLedger {
    handle: RedisHandle,
}

impl RedisLedger {
    /// A ledger over `handle`'s connections.
    pub fn new(handle: RedisHandle) -> Self {
        Self { handle }
    }
}

impl Ledger for RedisLedger {
    async fn claim(
        &self,
        _claims: &[Claim],
        _now: Timestamp,
        _totals: &mut [Totals],
    ) -> Result<(), StoreError> {
        let _ = &self.handle;
        Err(StoreError::Unavailable("not yet".into()))
    }

    async fn grant(&self, _grants: &[Grant], _now: Timestamp) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("not yet".into()))
    }

    async fn release(&self, _released: &[(CounterKey, Claimant)]) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("not yet".into()))
    }
}
