//! The admin gRPC service (`sluice.admin.v1.Admin`): configuration, statistics, IP blocks, the
//! allowlist and client resets, for operators with grpcurl. It runs on its own listener, behind
//! the token check in [`auth`]. Changes to blocks and the allowlist are written to the state
//! file before the call returns, so an acknowledged block survives a restart.
//!
//! Every string an operator sends is bounded (the `MAX_*` constants here and in
//! [`crate::access`]), and the lists come in pages: what one caller stores, every caller can
//! still list within gRPC's default 4 MiB message.

pub mod auth;

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::access::{
    AccessError, AllowEntry, AllowSource, Block, MAX_REASON_BYTES, canonical_address, parse_net,
};
use crate::algorithms::Policy;
use crate::limiter::Limiter;
use crate::limiter::model::{Limit, RuleSet};
use crate::proto::sluice::admin::v1 as pb;
use crate::proto::sluice::admin::v1::admin_server::Admin;
use crate::stats::{ClientReport, CountsSnapshot};
use crate::store::Store;

/// Most clients `GetStats` lists as the most limited.
pub const MAX_TOP: u32 = 1000;
/// Entries in a `ListBlocks` or `ListAllowed` page when the request asks for none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Most entries in a `ListBlocks` or `ListAllowed` page (a larger `page_size` gets this many).
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Longest `ip` accepted, in bytes: the longest address or CIDR text is 49.
pub const MAX_IP_BYTES: usize = 64;
/// Longest `domain` accepted, in bytes: as in a rate limit request.
pub const MAX_DOMAIN_BYTES: usize = crate::service::rls::MAX_FIELD_BYTES;
/// Longest `client` accepted, in bytes: any client id sluice reports (a domain and up to
/// [`crate::service::rls::MAX_ENTRIES`] values, each at most as long as a domain).
pub const MAX_CLIENT_BYTES: usize =
    (crate::service::rls::MAX_ENTRIES + 1) * (crate::service::rls::MAX_FIELD_BYTES + 1);
/// Longest `page_token` accepted, in bytes.
pub const MAX_PAGE_TOKEN_BYTES: usize = 128;

/// The admin service.
#[derive(Debug)]
pub struct AdminService<S> {
    limiter: Arc<Limiter<S>>,
    quotas: Arc<crate::quota::registry::Registry>,
}

impl<S> AdminService<S> {
    /// A service over `limiter`'s rules, blocks and statistics.
    pub fn new(limiter: Arc<Limiter<S>>) -> Self {
        Self {
            limiter,
            quotas: Arc::default(),
        }
    }

    /// Also reports these quota streams.
    pub fn with_quotas(mut self, quotas: Arc<crate::quota::registry::Registry>) -> Self {
        self.quotas = quotas;
        self
    }
}

/// The quota streams' statistics as `GetStats` shows them.
fn quota_pb(q: &crate::quota::registry::Registry) -> pb::QuotaStats {
    use crate::quota::assignment::Assignment;
    use std::sync::atomic::Ordering::Relaxed;
    let streams = q
        .streams()
        .into_iter()
        .map(|v| pb::QuotaStream {
            id: v.id,
            peer: v.peer,
            domain: v.domain,
            opened_at: Some(timestamp(v.opened.as_nanos())),
            last_report: Some(timestamp(v.updated.as_nanos())),
            buckets: v.bucket_count as u64,
            reports: v.reports,
            top_buckets: v
                .buckets
                .into_iter()
                .map(|b| pb::QuotaBucket {
                    bucket_id: b.entries.into_iter().collect(),
                    allowed: b.allowed,
                    denied: b.denied,
                    demand_per_second: b.demand,
                    assignment: b.assignment.kind().to_string(),
                    assigned_per_second: match b.assignment {
                        Assignment::TokenBucket { .. } => b.assignment.rate(),
                        Assignment::AllowAll | Assignment::DenyAll => 0.0,
                    },
                    max_tokens: match b.assignment {
                        Assignment::TokenBucket { max_tokens, .. } => max_tokens,
                        Assignment::AllowAll | Assignment::DenyAll => 0,
                    },
                })
                .collect(),
        })
        .collect();
    pb::QuotaStats {
        streams_open: q.open_streams(),
        reports: q.reports.load(Relaxed),
        reported_allowed: q.reported_allowed.load(Relaxed),
        reported_denied: q.reported_denied.load(Relaxed),
        streams,
    }
}

fn invalid(field: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {e}"))
}

/// Refuses `value` when longer than `max` bytes, naming `field` (and not echoing the value).
fn bounded(field: &str, value: &str, max: usize) -> Result<(), Status> {
    crate::access::check_len(field, value, max).map_err(Status::invalid_argument)
}

/// `ip`, bounded, as a network.
fn ip_field(ip: &str) -> Result<ipnet::IpNet, Status> {
    bounded("ip", ip, MAX_IP_BYTES)?;
    parse_net(ip).map_err(|e| invalid("ip", e))
}

/// The page size a request asks for, defaulted and capped.
fn page_size(requested: u32) -> usize {
    let size = match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    size as usize
}

/// A page token: the key of the last entry of the previous page, as text. Opaque to callers,
/// who pass back what they were given; anything else is refused.
fn parse_token<K>(token: &str, parse: impl Fn(&str) -> Option<K>) -> Result<Option<K>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    bounded("page_token", token, MAX_PAGE_TOKEN_BYTES)?;
    parse(token).map(Some).ok_or_else(|| {
        invalid(
            "page_token",
            "not a next_page_token this service gave (pass it back unchanged, or leave it empty for the first page)",
        )
    })
}

fn block_token(net: ipnet::IpNet) -> String {
    net.to_string()
}

fn parse_block_token(token: &str) -> Option<ipnet::IpNet> {
    token.parse().ok()
}

fn allow_token((net, source): (ipnet::IpNet, AllowSource)) -> String {
    format!("{} {net}", source_name(source))
}

fn parse_allow_token(token: &str) -> Option<(ipnet::IpNet, AllowSource)> {
    let (source, net) = token.split_once(' ')?;
    let source = match source {
        "config" => AllowSource::Config,
        "runtime" => AllowSource::Runtime,
        _ => return None,
    };
    Some((net.parse().ok()?, source))
}

fn source_name(source: AllowSource) -> &'static str {
    match source {
        AllowSource::Config => "config",
        AllowSource::Runtime => "runtime",
    }
}

/// A client query (a client id or an address) with an IPv4-mapped address as the IPv4 one,
/// as the limiter records clients.
fn canonical_client(client: &str) -> std::borrow::Cow<'_, str> {
    canonical_address(client).unwrap_or(std::borrow::Cow::Borrowed(client))
}

fn timestamp(nanos: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(nanos / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(nanos % 1_000_000_000).unwrap_or(0),
    }
}

fn counts(c: CountsSnapshot) -> pb::Counts {
    pb::Counts {
        allowed: c.allowed,
        limited: c.limited,
        blocked: c.blocked,
        near_limit: c.near_limit,
    }
}

fn block_pb(b: &Block) -> pb::Block {
    pb::Block {
        ip: b.net.to_string(),
        permanent: b.permanent,
        created_at: Some(timestamp(b.created_at)),
        expires_at: b.expires_at.map(timestamp),
        reason: b.reason.clone(),
        created_by: b.created_by.clone(),
    }
}

fn allow_pb(a: &AllowEntry) -> pb::AllowEntry {
    pb::AllowEntry {
        ip: a.net.to_string(),
        source: source_name(a.source).to_string(),
        created_at: (a.created_at > 0).then(|| timestamp(a.created_at)),
        reason: a.reason.clone(),
    }
}

fn client_pb(c: &ClientReport) -> pb::ClientStats {
    pb::ClientStats {
        client: c.id.clone(),
        domain: c.domain.clone(),
        address: c.address.clone().unwrap_or_default(),
        counts: Some(counts(c.counts)),
        last_seen: Some(timestamp(c.last_seen)),
    }
}

fn limit_pb(l: &Limit) -> pb::LimitConfig {
    let secs = |n: u64| n as f64 / 1e9;
    let (limit, window_seconds, burst, refill) = match l.policy {
        Policy::SlidingWindow { limit, window } | Policy::FixedWindow { limit, window } => {
            (limit, secs(window.get()), 0, 0.0)
        }
        Policy::TokenBucket { capacity, interval } => {
            (capacity, 0.0, capacity, 1.0 / secs(interval.get()))
        }
    };
    pb::LimitConfig {
        name: l.name.to_string(),
        rate: l.rate.clone(),
        algorithm: l.policy.algorithm().as_str().to_string(),
        limit,
        window_seconds,
        burst,
        refill_per_second: refill,
        shadow: l.shadow,
        reported_as: format!(
            "{}/{}",
            l.reported.requests_per_unit,
            l.reported.unit.as_str()
        ),
    }
}

fn config_pb(rules: &RuleSet, only: &str) -> pb::GetConfigResponse {
    pb::GetConfigResponse {
        enabled: rules.enabled,
        config_hash: format!("{:016x}", rules.source_hash),
        address_entry: rules.address_entry.clone(),
        config_allowlist: rules.allowlist.iter().map(|n| n.to_string()).collect(),
        domains: rules
            .domains
            .iter()
            .filter(|d| only.is_empty() || d.name == only)
            .map(|d| pb::DomainConfig {
                name: d.name.clone(),
                client_entries: d.client.clone(),
                endpoint_entry: d.endpoint_entry.clone(),
                endpoints: d
                    .rules
                    .iter()
                    .map(|r| pb::EndpointConfig {
                        path: r.name.clone(),
                        global: !r.conditions.is_empty(),
                        limits: r.limits.iter().map(limit_pb).collect(),
                    })
                    .collect(),
                auto_block: d.auto_block.as_ref().map(|a| pb::AutoBlockConfig {
                    enabled: true,
                    duration_seconds: a.duration.as_secs(),
                    max_requests: a
                        .max_requests
                        .as_ref()
                        .map(|l| l.rate.clone())
                        .unwrap_or_default(),
                    max_limited: a
                        .max_limited
                        .as_ref()
                        .map(|l| l.rate.clone())
                        .unwrap_or_default(),
                }),
            })
            .collect(),
    }
}

impl<S: Store> AdminService<S> {
    /// Writes the access lists to the state file off the async runtime.
    async fn persist(&self) -> Result<(), Status> {
        let access = self.limiter.access().clone();
        let result = tokio::task::spawn_blocking(move || access.persist())
            .await
            .map_err(|e| Status::internal(format!("state writer failed: {e}")))?;
        result.map_err(|e: AccessError| {
            tracing::error!(error = %e, "could not save blocks and allowlist");
            Status::internal(format!(
                "applied, but not saved (it will not survive a restart): {e}"
            ))
        })
    }

    fn peer<T>(req: &Request<T>) -> String {
        req.extensions()
            .get::<crate::connections::ConnInfo>()
            .map(|c| c.remote)
            .map_or_else(|| "admin".to_string(), |a| format!("admin (peer {a})"))
    }
}

#[tonic::async_trait]
impl<S: Store> Admin for AdminService<S> {
    async fn get_config(
        &self,
        request: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        let req = request.into_inner();
        bounded("domain", &req.domain, MAX_DOMAIN_BYTES)?;
        let rules = self.limiter.rules();
        if !req.domain.is_empty() && rules.domain(&req.domain).is_none() {
            return Err(Status::not_found(format!(
                "domain: no domain {:?}",
                req.domain
            )));
        }
        Ok(Response::new(config_pb(&rules, &req.domain)))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let req = request.into_inner();
        bounded("client", &req.client, MAX_CLIENT_BYTES)?;
        let stats = self.limiter.stats();
        let now = self.limiter.clock().now();
        let top = if req.top == 0 {
            10
        } else {
            req.top.min(MAX_TOP)
        };
        let mut domains = Vec::new();
        let mut endpoints = Vec::new();
        for (domain, endpoint, c) in stats.all_counts() {
            if endpoint.is_empty() {
                domains.push(pb::DomainStats {
                    domain,
                    counts: Some(counts(c)),
                });
            } else {
                endpoints.push(pb::EndpointStats {
                    domain,
                    endpoint,
                    counts: Some(counts(c)),
                });
            }
        }
        let clients = if req.client.is_empty() {
            Vec::new()
        } else {
            stats
                .find_clients(&canonical_client(&req.client))
                .iter()
                .map(client_pb)
                .collect()
        };
        Ok(Response::new(pb::GetStatsResponse {
            total: Some(counts(stats.total.snapshot())),
            domains,
            endpoints,
            tracked_clients: stats.tracked_clients() as u64,
            tracked_keys: self.limiter.store().tracked_keys() as u64,
            active_blocks: self.limiter.access().active_blocks_at(now) as u64,
            top_limited: stats
                .top_limited(top as usize)
                .iter()
                .map(client_pb)
                .collect(),
            clients,
            automatic_blocks: stats
                .automatic_blocks
                .load(std::sync::atomic::Ordering::Relaxed),
            quota: Some(quota_pb(&self.quotas)),
        }))
    }

    async fn block_ip(
        &self,
        request: Request<pb::BlockIpRequest>,
    ) -> Result<Response<pb::BlockIpResponse>, Status> {
        let by = Self::peer(&request);
        let req = request.into_inner();
        let net = ip_field(&req.ip)?;
        bounded("reason", &req.reason, MAX_REASON_BYTES)?;
        let duration = match (req.permanent, req.duration_seconds) {
            (true, _) => None,
            (false, 0) => {
                return Err(invalid(
                    "duration_seconds",
                    "required for a temporary block (or set permanent: true)",
                ));
            }
            (false, s) => Some(Duration::from_secs(s)),
        };
        let reason = if req.reason.is_empty() {
            "blocked by an operator".to_string()
        } else {
            req.reason
        };
        let now = self.limiter.clock().now();
        let block = self.limiter.access().block(net, duration, reason, by, now);
        tracing::info!(ip = %block.net, permanent = block.permanent, created_by = %block.created_by, "blocked");
        self.persist().await?;
        Ok(Response::new(pb::BlockIpResponse {
            block: Some(block_pb(&block)),
        }))
    }

    async fn unblock_ip(
        &self,
        request: Request<pb::UnblockIpRequest>,
    ) -> Result<Response<pb::UnblockIpResponse>, Status> {
        let req = request.into_inner();
        let net = ip_field(&req.ip)?;
        let removed = self.limiter.access().unblock(net);
        if removed {
            tracing::info!(ip = %net, "unblocked");
            self.persist().await?;
        }
        Ok(Response::new(pb::UnblockIpResponse { removed }))
    }

    async fn list_blocks(
        &self,
        request: Request<pb::ListBlocksRequest>,
    ) -> Result<Response<pb::ListBlocksResponse>, Status> {
        let req = request.into_inner();
        let after = parse_token(&req.page_token, parse_block_token)?;
        let now = self.limiter.clock().now();
        let (blocks, next) =
            self.limiter
                .access()
                .blocks_page_at(now, after, page_size(req.page_size));
        Ok(Response::new(pb::ListBlocksResponse {
            blocks: blocks.iter().map(block_pb).collect(),
            next_page_token: next.map(block_token).unwrap_or_default(),
        }))
    }

    async fn allow(
        &self,
        request: Request<pb::AllowRequest>,
    ) -> Result<Response<pb::AllowResponse>, Status> {
        let by = Self::peer(&request);
        let req = request.into_inner();
        let net = ip_field(&req.ip)?;
        bounded("reason", &req.reason, MAX_REASON_BYTES)?;
        let reason = if req.reason.is_empty() {
            by
        } else {
            req.reason
        };
        let entry = self
            .limiter
            .access()
            .allow(net, reason, self.limiter.clock().now());
        tracing::info!(ip = %net, "allowlisted");
        self.persist().await?;
        Ok(Response::new(pb::AllowResponse {
            entry: Some(allow_pb(&entry)),
        }))
    }

    async fn disallow(
        &self,
        request: Request<pb::DisallowRequest>,
    ) -> Result<Response<pb::DisallowResponse>, Status> {
        let req = request.into_inner();
        let net = ip_field(&req.ip)?;
        let removed = self.limiter.access().disallow(net);
        if removed {
            tracing::info!(ip = %net, "removed from the allowlist");
            self.persist().await?;
        }
        Ok(Response::new(pb::DisallowResponse { removed }))
    }

    async fn list_allowed(
        &self,
        request: Request<pb::ListAllowedRequest>,
    ) -> Result<Response<pb::ListAllowedResponse>, Status> {
        let req = request.into_inner();
        let after = parse_token(&req.page_token, parse_allow_token)?;
        let (entries, next) = self
            .limiter
            .access()
            .allowed_page(after, page_size(req.page_size));
        Ok(Response::new(pb::ListAllowedResponse {
            entries: entries.iter().map(allow_pb).collect(),
            next_page_token: next.map(allow_token).unwrap_or_default(),
        }))
    }

    async fn reset_client(
        &self,
        request: Request<pb::ResetClientRequest>,
    ) -> Result<Response<pb::ResetClientResponse>, Status> {
        let mut req = request.into_inner();
        bounded("domain", &req.domain, MAX_DOMAIN_BYTES)?;
        bounded("client", &req.client, MAX_CLIENT_BYTES)?;
        if req.client.is_empty() {
            return Err(invalid("client", "must not be empty"));
        }
        req.client = canonical_client(&req.client).into_owned();
        let rules = self.limiter.rules();
        let domain = rules
            .domain(&req.domain)
            .ok_or_else(|| Status::not_found(format!("domain: no domain {:?}", req.domain)))?;
        let mut clients: Vec<(Vec<String>, Option<String>)> = self
            .limiter
            .stats()
            .find_clients(&req.client)
            .into_iter()
            .filter(|c| c.domain == domain.name)
            .map(|c| (c.values, c.address))
            .collect();
        // A client never seen (or no longer tracked) whose identity is just its address.
        if clients.is_empty()
            && domain.identified_by(&rules.address_entry)
            && parse_net(&req.client).is_ok()
        {
            clients.push((vec![req.client.clone()], Some(req.client.clone())));
        }
        let mut keys = Vec::new();
        for (values, address) in &clients {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            keys.extend(
                self.limiter
                    .client_keys(domain, &values, address.as_deref()),
            );
        }
        self.limiter
            .store()
            .forget(&keys)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::info!(domain = %domain.name, client = %req.client, clients = clients.len(), "reset client counters");
        Ok(Response::new(pb::ResetClientResponse {
            clients: u32::try_from(clients.len()).unwrap_or(u32::MAX),
            counters: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        }))
    }
}
