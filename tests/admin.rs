//! The admin service over gRPC: auth on every RPC, blocks (temporary, permanent, CIDR) taking
//! effect on the next decision and surviving restarts, the allowlist, automatic blocks, stats
//! matching the decisions made, client resets and the effective config.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use sluice::config;
use sluice::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use sluice::proto::sluice::admin::v1 as pb;
use tonic::Code as GrpcCode;

fn body(r: &RateLimitResponse) -> String {
    String::from_utf8(r.raw_body.clone()).unwrap()
}

async fn block(srv: &TestServer, ip: &str, secs: u64, permanent: bool) -> pb::Block {
    srv.admin()
        .await
        .block_ip(authed(pb::BlockIpRequest {
            ip: ip.into(),
            duration_seconds: secs,
            permanent,
            reason: "test".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .block
        .unwrap()
}

#[tokio::test]
async fn every_rpc_needs_the_token() {
    let srv = TestServer::start_default().await;
    let mut admin = srv.admin().await;
    macro_rules! check_all {
        ($wrap:expr, $expect_ok:expr) => {{
            let results: Vec<(&str, Result<(), tonic::Status>)> = vec![
                (
                    "GetConfig",
                    admin
                        .get_config($wrap(pb::GetConfigRequest::default()))
                        .await
                        .map(drop),
                ),
                (
                    "GetStats",
                    admin
                        .get_stats($wrap(pb::GetStatsRequest::default()))
                        .await
                        .map(drop),
                ),
                (
                    "BlockIp",
                    admin
                        .block_ip($wrap(pb::BlockIpRequest {
                            ip: "192.0.2.1".into(),
                            duration_seconds: 5,
                            ..Default::default()
                        }))
                        .await
                        .map(drop),
                ),
                (
                    "UnblockIp",
                    admin
                        .unblock_ip($wrap(pb::UnblockIpRequest {
                            ip: "192.0.2.1".into(),
                        }))
                        .await
                        .map(drop),
                ),
                (
                    "ListBlocks",
                    admin
                        .list_blocks($wrap(pb::ListBlocksRequest::default()))
                        .await
                        .map(drop),
                ),
                (
                    "Allow",
                    admin
                        .allow($wrap(pb::AllowRequest {
                            ip: "192.0.2.2".into(),
                            reason: String::new(),
                        }))
                        .await
                        .map(drop),
                ),
                (
                    "Disallow",
                    admin
                        .disallow($wrap(pb::DisallowRequest {
                            ip: "192.0.2.2".into(),
                        }))
                        .await
                        .map(drop),
                ),
                (
                    "ListAllowed",
                    admin
                        .list_allowed($wrap(pb::ListAllowedRequest::default()))
                        .await
                        .map(drop),
                ),
                (
                    "ResetClient",
                    admin
                        .reset_client($wrap(pb::ResetClientRequest {
                            domain: "training".into(),
                            client: "192.0.2.3".into(),
                        }))
                        .await
                        .map(drop),
                ),
            ];
            for (rpc, r) in results {
                match r {
                    Ok(()) => assert!($expect_ok, "{rpc} succeeded without the right token"),
                    Err(s) => {
                        assert!(!$expect_ok, "{rpc} failed with the right token: {s:?}");
                        assert_eq!(s.code(), GrpcCode::Unauthenticated, "{rpc}: {s:?}");
                    }
                }
            }
        }};
    }
    check_all!(tonic::Request::new, false);
    check_all!(|m| with_token(m, "wrong-token"), false);
    check_all!(authed, true);
}

#[tokio::test]
async fn a_block_takes_effect_on_the_next_decision_and_expires_on_time() {
    let srv = TestServer::start_default().await;
    let ip = "198.51.100.7";
    assert_eq!(
        srv.call(training("/api/training/execute", ip))
            .await
            .overall_code,
        OK
    );

    let b = block(&srv, ip, 120, false).await;
    assert_eq!(b.ip, "198.51.100.7/32");
    assert!(!b.permanent);
    assert_eq!(b.created_at.as_ref().unwrap().seconds as u64, T0);
    assert_eq!(b.expires_at.as_ref().unwrap().seconds as u64, T0 + 120);
    assert!(
        b.created_by.starts_with("admin (peer 127.0.0.1:"),
        "{}",
        b.created_by
    );

    let r = srv.call(training("/api/training/execute", ip)).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(r.statuses[0].code, OVER);
    assert_eq!(
        body(&r),
        r#"{"error": "IP temporarily blocked due to excessive requests"}"#
    );
    assert_eq!(header(&r, "retry-after"), Some("120"));
    // Blocked on every domain and path, even ones without limits.
    let r = srv.call(training("/no/limit/here", ip)).await;
    assert_eq!(r.overall_code, OVER);
    // Other clients are not affected.
    assert_eq!(
        srv.call(training("/api/training/execute", "198.51.100.8"))
            .await
            .overall_code,
        OK
    );

    srv.advance(100);
    let r = srv.call(training("/api/training/execute", ip)).await;
    assert_eq!(header(&r, "retry-after"), Some("20"));
    srv.advance(20);
    let r = srv.call(training("/api/training/execute", ip)).await;
    assert_eq!(r.overall_code, OK, "the block expired");
    // The request at T0 has aged out; the blocked one at T0+100 (previous window, still fully
    // weighted) consumed nothing, so only this one counts.
    assert_eq!(r.statuses[0].limit_remaining, 9);
    let blocks = srv
        .admin()
        .await
        .list_blocks(authed(pb::ListBlocksRequest::default()))
        .await
        .unwrap();
    assert!(blocks.into_inner().blocks.is_empty());
}

#[tokio::test]
async fn unblock_lets_the_client_back_and_permanent_blocks_say_so() {
    let srv = TestServer::start_default().await;
    let ip = "2001:db8::42";
    let b = block(&srv, ip, 0, true).await;
    assert!(b.permanent && b.expires_at.is_none());
    let r = srv.call(training("/api/training/execute", ip)).await;
    assert_eq!(body(&r), r#"{"error": "IP permanently blocked"}"#);
    assert_eq!(header(&r, "retry-after"), None);
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    srv.advance(365 * 86_400);
    assert_eq!(
        srv.call(training("/api/training/execute", ip))
            .await
            .overall_code,
        OVER
    );

    let mut admin = srv.admin().await;
    let removed = admin
        .unblock_ip(authed(pb::UnblockIpRequest { ip: ip.into() }))
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert!(removed);
    assert_eq!(
        srv.call(training("/api/training/execute", ip))
            .await
            .overall_code,
        OK
    );
    let again = admin
        .unblock_ip(authed(pb::UnblockIpRequest { ip: ip.into() }))
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert!(!again);
}

#[tokio::test]
async fn cidr_blocks_and_allows_compose_with_the_allowlist_winning() {
    let yaml = "allowlist: [203.0.113.0/28]\ndomains:\n  - name: d\n    endpoints:\n      - path: /a\n        limits: [1/minute]\n";
    let srv = TestServer::start(yaml).await;
    let req = |ip: &str| {
        request(
            "d",
            vec![descriptor(&[("path", "/a"), ("remote_address", ip)])],
        )
    };
    block(&srv, "10.0.0.0/8", 600, false).await;
    assert_eq!(srv.call(req("10.200.1.1")).await.overall_code, OVER);

    let mut admin = srv.admin().await;
    let entry = admin
        .allow(authed(pb::AllowRequest {
            ip: "10.1.0.0/16".into(),
            reason: "office".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(
        (entry.ip.as_str(), entry.source.as_str()),
        ("10.1.0.0/16", "runtime")
    );
    // Allowlisted: inside the blocked /8, and no limit applies at all.
    for _ in 0..5 {
        let r = srv.call(req("10.1.2.3")).await;
        assert_eq!(r.overall_code, OK);
        assert!(r.statuses[0].current_limit.is_none());
    }
    assert_eq!(srv.call(req("10.2.0.1")).await.overall_code, OVER);
    // From the config file too.
    for _ in 0..3 {
        assert_eq!(srv.call(req("203.0.113.9")).await.overall_code, OK);
    }
    let listed: Vec<(String, String)> = admin
        .list_allowed(authed(pb::ListAllowedRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| (e.ip, e.source))
        .collect();
    assert_eq!(
        listed,
        [
            ("10.1.0.0/16".to_string(), "runtime".to_string()),
            ("203.0.113.0/28".to_string(), "config".to_string())
        ]
    );
    assert!(
        admin
            .disallow(authed(pb::DisallowRequest {
                ip: "10.1.0.0/16".into()
            }))
            .await
            .unwrap()
            .into_inner()
            .removed
    );
    assert_eq!(srv.call(req("10.1.2.3")).await.overall_code, OVER);
}

#[tokio::test]
async fn blocks_and_allows_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let setup = Setup {
        state_file: Some(state.clone()),
        token: Some(ADMIN_TOKEN.into()),
        start: None,
    };
    let cfg = || {
        let text = std::fs::read_to_string(repo_path("config/sluice.yaml")).unwrap();
        config::parse(&text, "sluice.yaml", |_| None).unwrap()
    };
    let srv = TestServer::start_setup(cfg(), setup.clone()).await;
    block(&srv, "192.0.2.50", 3600, false).await;
    srv.admin()
        .await
        .allow(authed(pb::AllowRequest {
            ip: "192.0.2.60".into(),
            reason: String::new(),
        }))
        .await
        .unwrap();
    srv.stop().await;

    let srv = TestServer::start_setup(
        cfg(),
        Setup {
            start: Some(sluice::clock::Timestamp::from_secs(T0 + 60)),
            ..setup.clone()
        },
    )
    .await;
    let r = srv
        .call(training("/api/training/execute", "192.0.2.50"))
        .await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(header(&r, "retry-after"), Some("3540"));
    let r = srv
        .call(training("/api/training/execute", "192.0.2.60"))
        .await;
    assert!(r.statuses[0].current_limit.is_none(), "still allowlisted");
    srv.stop().await;

    // A damaged state file stops start-up and is left alone.
    std::fs::write(&state, "{broken").unwrap();
    let err = sluice::access::AccessList::open(Some(state.clone()), vec![]).unwrap_err();
    assert!(err.to_string().contains("is damaged"), "{err}");
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "{broken");
}

const AUTO: &str = "\
domains:
  - name: d
    auto_block:
      duration_seconds: 3600
      max_requests: 5/minute
    endpoints:
      - path: /a
        limits: [100/minute]
  - name: e
    auto_block:
      max_limited: 2/10 minutes
    endpoints:
      - path: /a
        limits: [1/minute]
";

#[tokio::test]
async fn too_many_requests_across_endpoints_blocks_the_address() {
    let srv = TestServer::start(AUTO).await;
    let req = |path: &str| {
        request(
            "d",
            vec![descriptor(&[
                ("path", path),
                ("remote_address", "192.0.2.9"),
            ])],
        )
    };
    // Five requests within the minute, on any paths, are fine; the sixth exceeds 5/minute.
    for path in ["/a", "/b", "/a", "/c", "/a"] {
        assert_eq!(srv.call(req(path)).await.overall_code, OK);
    }
    assert_eq!(
        srv.call(req("/a")).await.overall_code,
        OK,
        "the triggering request was decided already"
    );
    let r = srv.call(req("/a")).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(header(&r, "retry-after"), Some("3600"));

    let blocks = srv
        .admin()
        .await
        .list_blocks(authed(pb::ListBlocksRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .blocks;
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].ip, "192.0.2.9/32");
    assert_eq!(blocks[0].created_by, "auto-block d");
    assert_eq!(
        blocks[0].reason,
        "more than 5/minute requests across all endpoints"
    );
    assert_eq!(
        blocks[0].expires_at.as_ref().unwrap().seconds as u64,
        T0 + 3600
    );
    // Another address is unaffected.
    let other = request(
        "d",
        vec![descriptor(&[
            ("path", "/a"),
            ("remote_address", "192.0.2.10"),
        ])],
    );
    assert_eq!(srv.call(other).await.overall_code, OK);

    let stats = srv
        .admin()
        .await
        .get_stats(authed(pb::GetStatsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.automatic_blocks, 1);
    assert_eq!(stats.active_blocks, 1);
}

#[tokio::test]
async fn being_limited_too_often_blocks_the_address() {
    let srv = TestServer::start(AUTO).await;
    let req = || {
        request(
            "e",
            vec![descriptor(&[
                ("path", "/a"),
                ("remote_address", "192.0.2.20"),
            ])],
        )
    };
    assert_eq!(srv.call(req()).await.overall_code, OK);
    // Limited twice: within "2/10 minutes".
    for _ in 0..2 {
        let r = srv.call(req()).await;
        assert_eq!(r.overall_code, OVER);
        assert!(body(&r).contains("Rate limit exceeded"));
    }
    // The third limited decision exceeds it: the address is blocked for the default hour.
    srv.call(req()).await;
    let r = srv.call(req()).await;
    assert_eq!(
        body(&r),
        r#"{"error": "IP temporarily blocked due to excessive requests"}"#
    );
    assert_eq!(header(&r, "retry-after"), Some("3600"));
    let blocks = srv
        .admin()
        .await
        .list_blocks(authed(pb::ListBlocksRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .blocks;
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].reason, "more than 2/10 minutes limited requests");
}

#[tokio::test]
async fn stats_count_the_decisions_made() {
    let srv = TestServer::start_default().await;
    for _ in 0..12 {
        srv.call(training("/api/training/execute", "192.0.2.1"))
            .await;
    }
    for _ in 0..3 {
        srv.call(training("/api/filesystem/read", "192.0.2.2"))
            .await;
    }
    srv.call(training("/unlimited", "192.0.2.3")).await;
    block(&srv, "192.0.2.4", 60, false).await;
    srv.call(training("/api/training/execute", "192.0.2.4"))
        .await;
    srv.call(talk2me("/transcribe", "192.0.2.5", "ua")).await;

    let mut admin = srv.admin().await;
    let s = admin
        .get_stats(authed(pb::GetStatsRequest {
            client: "192.0.2.1".into(),
            top: 5,
        }))
        .await
        .unwrap()
        .into_inner();
    let c = |c: &Option<pb::Counts>| {
        let c = c.unwrap();
        (c.allowed, c.limited, c.blocked, c.near_limit)
    };
    // Requests: 10 + 3 + 1 + 1 allowed, 2 limited, 1 blocked. Near limit: executes 8, 9, 10.
    assert_eq!(c(&s.total), (15, 2, 1, 3));
    let domain = |name: &str| s.domains.iter().find(|d| d.domain == name).unwrap().counts;
    assert_eq!(c(&domain("training")), (14, 2, 1, 3));
    assert_eq!(c(&domain("talk2me")), (1, 0, 0, 0));
    let endpoint = |d: &str, e: &str| {
        s.endpoints
            .iter()
            .find(|x| x.domain == d && x.endpoint == e)
            .unwrap()
            .counts
    };
    assert_eq!(
        c(&endpoint("training", "/api/training/execute")),
        (10, 2, 0, 3)
    );
    assert_eq!(
        c(&endpoint("training", "/api/filesystem/read")),
        (3, 0, 0, 0)
    );
    assert_eq!(c(&endpoint("talk2me", "/transcribe")), (1, 0, 0, 0));
    assert_eq!(c(&endpoint("talk2me", "global")), (1, 0, 0, 0));
    assert_eq!(s.clients.len(), 1);
    assert_eq!(s.clients[0].client, "training|192.0.2.1");
    assert_eq!(c(&s.clients[0].counts), (10, 2, 0, 3));
    assert_eq!(s.top_limited.len(), 1);
    assert_eq!(s.top_limited[0].client, "training|192.0.2.1");
    assert_eq!(s.tracked_clients, 5);
    assert!(s.tracked_keys >= 4);
    assert_eq!(s.active_blocks, 1);
}

#[tokio::test]
async fn reset_client_forgets_its_counters() {
    let srv = TestServer::start_default().await;
    for _ in 0..10 {
        srv.call(training("/api/training/execute", "192.0.2.77"))
            .await;
    }
    assert_eq!(
        srv.call(training("/api/training/execute", "192.0.2.77"))
            .await
            .overall_code,
        OVER
    );
    let r = srv
        .admin()
        .await
        .reset_client(authed(pb::ResetClientRequest {
            domain: "training".into(),
            client: "192.0.2.77".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.clients, 1);
    assert_eq!(r.counters, 9, "one per endpoint limit of the domain");
    let after = srv
        .call(training("/api/training/execute", "192.0.2.77"))
        .await;
    assert_eq!(after.overall_code, OK);
    assert_eq!(after.statuses[0].limit_remaining, 9);

    // Talk2Me clients are address + user agent: reset by address resets each of them.
    for ua in ["a", "b"] {
        for _ in 0..3 {
            srv.call(talk2me("/transcribe", "192.0.2.78", ua)).await;
        }
    }
    let r = srv
        .admin()
        .await
        .reset_client(authed(pb::ResetClientRequest {
            domain: "talk2me".into(),
            client: "192.0.2.78".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.clients, 2);
    assert_eq!(
        srv.call(talk2me("/transcribe", "192.0.2.78", "a"))
            .await
            .overall_code,
        OK
    );

    let err = srv
        .admin()
        .await
        .reset_client(authed(pb::ResetClientRequest {
            domain: "nope".into(),
            client: "x".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), GrpcCode::NotFound);
}

#[tokio::test]
async fn get_config_reports_the_effective_limits() {
    let srv = TestServer::start_default().await;
    let cfg = srv
        .admin()
        .await
        .get_config(authed(pb::GetConfigRequest {
            domain: "talk2me".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(cfg.enabled);
    assert_eq!(cfg.config_hash.len(), 16);
    assert_eq!(cfg.domains.len(), 1);
    let d = &cfg.domains[0];
    assert_eq!(d.client_entries, ["remote_address", "user_agent"]);
    let transcribe = &d.endpoints[0];
    assert_eq!(transcribe.path, "/transcribe");
    let names: Vec<(&str, &str, &str)> = transcribe
        .limits
        .iter()
        .map(|l| {
            (
                l.name.as_str(),
                l.algorithm.as_str(),
                l.reported_as.as_str(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("per minute", "sliding_window", "10/minute"),
            ("per hour", "sliding_window", "100/hour"),
            ("burst", "token_bucket", "10/minute"),
        ]
    );
    let burst = &transcribe.limits[2];
    assert_eq!(burst.burst, 3);
    assert!((burst.refill_per_second - 1.0 / 6.0).abs() < 1e-9);
    assert_eq!(transcribe.limits[0].window_seconds, 60.0);
    let global = d.endpoints.iter().find(|e| e.global).unwrap();
    assert_eq!(global.limits.len(), 2);
}

#[tokio::test]
async fn bad_admin_input_is_invalid_argument_naming_the_field() {
    let srv = TestServer::start_default().await;
    let mut admin = srv.admin().await;
    let err = admin
        .block_ip(authed(pb::BlockIpRequest {
            ip: "999.1.1.1".into(),
            duration_seconds: 5,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), GrpcCode::InvalidArgument);
    assert!(err.message().starts_with("ip: "), "{}", err.message());
    let err = admin
        .block_ip(authed(pb::BlockIpRequest {
            ip: "192.0.2.1".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), GrpcCode::InvalidArgument);
    assert!(
        err.message().starts_with("duration_seconds: "),
        "{}",
        err.message()
    );
}

/// No credential, no admin listener: not on a public address, and not on loopback either,
/// which every container of a pod shares.
#[tokio::test]
async fn an_admin_listener_without_a_credential_is_refused_even_on_loopback() {
    for addr in ["0.0.0.0:0", "127.0.0.1:0"] {
        let cfg = config::parse("domains:\n  - name: d\n", "t.yaml", |_| None).unwrap();
        let limiter = std::sync::Arc::new(sluice::limiter::Limiter::new(
            cfg.rules,
            sluice::store::MemoryStore::new(Default::default()),
            std::sync::Arc::new(sluice::clock::SystemClock),
        ));
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind(addr).await.unwrap();
        let err = sluice::server::run(
            sluice::server::Listeners {
                grpc,
                admin: Some(admin),
                http: None,
            },
            limiter,
            sluice::server::Options::default(),
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("SLUICE_ADMIN_TOKEN"),
            "{addr}: {err}"
        );
        assert!(
            err.to_string().contains("--admin-tls-client-ca"),
            "{addr}: {err}"
        );
    }
}

/// An IPv4 client reaches sluice as `192.0.2.7` or, through a dual-stack listener, as
/// `::ffff:192.0.2.7`: blocks and allowlist entries made with either spelling match both, are
/// stored as IPv4, and the client's statistics and counters are one client's.
#[tokio::test]
async fn ipv4_mapped_and_plain_addresses_are_the_same_client() {
    let yaml = "allowlist: ['::ffff:10.9.0.0/112']\ndomains:\n  - name: d\n    endpoints:\n      - path: /a\n        limits: [3/minute]\n";
    let srv = TestServer::start(yaml).await;
    let req = |ip: &str| {
        request(
            "d",
            vec![descriptor(&[("path", "/a"), ("remote_address", ip)])],
        )
    };
    let mut admin = srv.admin().await;

    // One counter whichever the spelling: the third call of 3/minute is the last admitted.
    for ip in ["192.0.2.1", "::ffff:192.0.2.1", "::ffff:c000:201"] {
        assert_eq!(srv.call(req(ip)).await.overall_code, OK, "{ip}");
    }
    assert_eq!(srv.call(req("::ffff:192.0.2.1")).await.overall_code, OVER);
    let stats = admin
        .get_stats(authed(pb::GetStatsRequest {
            client: "::ffff:192.0.2.1".into(),
            top: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.clients.len(), 1);
    assert_eq!(stats.clients[0].client, "d|192.0.2.1");
    assert_eq!(stats.clients[0].address, "192.0.2.1");
    let counts = stats.clients[0].counts.unwrap();
    assert_eq!((counts.allowed, counts.limited), (3, 1));

    // Blocks made with either spelling, listed as IPv4, match both spellings.
    let b = block(&srv, "::ffff:192.0.2.7", 600, false).await;
    assert_eq!(b.ip, "192.0.2.7/32");
    let b = block(&srv, "::ffff:198.51.100.0/120", 600, false).await;
    assert_eq!(b.ip, "198.51.100.0/24");
    block(&srv, "203.0.113.0/24", 600, false).await;
    for ip in [
        "192.0.2.7",
        "::ffff:192.0.2.7",
        "198.51.100.9",
        "::ffff:198.51.100.9",
        "203.0.113.5",
        "::ffff:203.0.113.5",
    ] {
        let r = srv.call(req(ip)).await;
        assert_eq!(r.overall_code, OVER, "{ip} is blocked");
        assert!(header(&r, "retry-after").is_some(), "{ip}: as a block");
    }
    assert_eq!(srv.call(req("::ffff:192.0.2.8")).await.overall_code, OK);

    // The allowlist too, from the admin API and from the config file.
    let entry = admin
        .allow(authed(pb::AllowRequest {
            ip: "::ffff:203.0.113.5".into(),
            reason: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(entry.ip, "203.0.113.5/32");
    for ip in [
        "203.0.113.5",
        "::ffff:203.0.113.5",
        "10.9.1.1",
        "::ffff:10.9.1.1",
    ] {
        let r = srv.call(req(ip)).await;
        assert_eq!(r.overall_code, OK, "{ip} is allowlisted");
        assert!(
            r.statuses[0].current_limit.is_none(),
            "{ip}: no limit applies"
        );
    }
    let config = admin
        .get_config(authed(pb::GetConfigRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(config.config_allowlist, ["10.9.0.0/16"]);

    // Removed with the other spelling than the one that made it.
    for ip in ["192.0.2.7", "::ffff:198.51.100.0/120"] {
        let removed = admin
            .unblock_ip(authed(pb::UnblockIpRequest { ip: ip.into() }))
            .await
            .unwrap()
            .into_inner()
            .removed;
        assert!(removed, "{ip}");
    }
    assert_eq!(srv.call(req("::ffff:192.0.2.7")).await.overall_code, OK);
    assert_eq!(srv.call(req("198.51.100.9")).await.overall_code, OK);
}

/// Every string an operator sends is bounded, and a longer one is refused naming the field:
/// long `reason`s once made the state file, and every `ListBlocks` after it, too large.
#[tokio::test]
async fn admin_strings_past_their_bound_are_invalid_argument_naming_the_field() {
    let srv = TestServer::start_default().await;
    let mut admin = srv.admin().await;
    let long = |n: usize| "x".repeat(n);
    let refused = |r: Result<(), tonic::Status>, field: &str| {
        let s = r.expect_err(field);
        assert_eq!(s.code(), GrpcCode::InvalidArgument, "{field}: {s:?}");
        assert!(
            s.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            s.message()
        );
        assert!(s.message().len() < 200, "{field}: the value is not echoed");
    };
    let block = |ip: String, reason: String| pb::BlockIpRequest {
        ip,
        duration_seconds: 60,
        permanent: false,
        reason,
    };
    refused(
        admin
            .block_ip(authed(block("192.0.2.1".into(), long(60_000))))
            .await
            .map(drop),
        "reason",
    );
    refused(
        admin
            .block_ip(authed(block("192.0.2.1".into(), long(1025))))
            .await
            .map(drop),
        "reason",
    );
    refused(
        admin
            .block_ip(authed(block(long(65), String::new())))
            .await
            .map(drop),
        "ip",
    );
    refused(
        admin
            .unblock_ip(authed(pb::UnblockIpRequest { ip: long(60_000) }))
            .await
            .map(drop),
        "ip",
    );
    refused(
        admin
            .allow(authed(pb::AllowRequest {
                ip: "192.0.2.1".into(),
                reason: long(1025),
            }))
            .await
            .map(drop),
        "reason",
    );
    refused(
        admin
            .disallow(authed(pb::DisallowRequest { ip: long(65) }))
            .await
            .map(drop),
        "ip",
    );
    refused(
        admin
            .get_config(authed(pb::GetConfigRequest { domain: long(1025) }))
            .await
            .map(drop),
        "domain",
    );
    refused(
        admin
            .get_stats(authed(pb::GetStatsRequest {
                client: long(40_000),
                top: 0,
            }))
            .await
            .map(drop),
        "client",
    );
    refused(
        admin
            .reset_client(authed(pb::ResetClientRequest {
                domain: "training".into(),
                client: long(40_000),
            }))
            .await
            .map(drop),
        "client",
    );
    refused(
        admin
            .reset_client(authed(pb::ResetClientRequest {
                domain: long(1025),
                client: "192.0.2.1".into(),
            }))
            .await
            .map(drop),
        "domain",
    );
    for token in ["not a token", "config", "runtime 10.0.0.0", &long(129)] {
        refused(
            admin
                .list_blocks(authed(pb::ListBlocksRequest {
                    page_size: 0,
                    page_token: token.to_string(),
                }))
                .await
                .map(drop),
            "page_token",
        );
        refused(
            admin
                .list_allowed(authed(pb::ListAllowedRequest {
                    page_size: 0,
                    page_token: token.to_string(),
                }))
                .await
                .map(drop),
            "page_token",
        );
    }
    // At the bound, accepted as sent.
    let b = admin
        .block_ip(authed(block("192.0.2.1".into(), long(1024))))
        .await
        .unwrap()
        .into_inner()
        .block
        .unwrap();
    assert_eq!(b.reason.len(), 1024);
}

/// `ListBlocks` and `ListAllowed` answer a page at a time in network order, 100 by default and
/// at most 1000, and following `next_page_token` lists every entry exactly once, also while
/// entries come and go between pages.
#[tokio::test]
async fn long_lists_come_in_pages_that_list_each_entry_once() {
    let yaml = "allowlist: [10.0.0.0/8, 10.0.0.0/8, 172.16.0.0/12]\ndomains:\n  - name: d\n";
    let srv = TestServer::start(yaml).await;
    let access = srv.limiter.access();
    let now = sluice::clock::Timestamp::from_secs(T0);
    let net =
        |i: u32| sluice::access::parse_net(&format!("198.18.{}.{}", i / 256, i % 256)).unwrap();
    for i in 0..1500 {
        access.block(net(i), None, "r".into(), "test".into(), now);
    }
    let mut admin = srv.admin().await;
    let page = |size: u32, token: String| {
        let mut admin = admin.clone();
        async move {
            admin
                .list_blocks(authed(pb::ListBlocksRequest {
                    page_size: size,
                    page_token: token,
                }))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = page(0, String::new()).await;
    assert_eq!(first.blocks.len(), 100, "the default page");
    assert!(!first.next_page_token.is_empty());
    let big = page(5000, String::new()).await;
    assert_eq!(big.blocks.len(), 1000, "at most 1000");

    // Walk 1,500 blocks 400 at a time, removing one already listed and one not yet listed and
    // adding one after the cursor on the way.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let p = page(400, token).await;
        assert!(p.blocks.len() <= 400);
        seen.extend(p.blocks.into_iter().map(|b| b.ip));
        if seen.len() == 400 {
            access.unblock(net(10));
            access.unblock(net(1200));
            access.block(net(1600), None, "r".into(), "test".into(), now);
        }
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    let mut expected: Vec<String> = (0..1500)
        .filter(|i| *i != 1200)
        .chain([1600])
        .map(|i| net(i).to_string())
        .collect();
    let mut sorted = seen.clone();
    sorted.sort_by_key(|ip| sluice::access::parse_net(ip).unwrap());
    assert_eq!(seen, sorted, "in network order");
    expected.sort_by_key(|ip| sluice::access::parse_net(ip).unwrap());
    assert_eq!(seen, expected, "each once");

    // The allowlist: config entries (one listed once however often configured) and runtime
    // ones, a runtime entry of a config network after it, across page boundaries.
    for ip in ["10.0.0.0/8", "192.0.2.0/24", "1.2.3.4"] {
        admin
            .allow(authed(pb::AllowRequest {
                ip: ip.into(),
                reason: String::new(),
            }))
            .await
            .unwrap();
    }
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let p = admin
            .list_allowed(authed(pb::ListAllowedRequest {
                page_size: 2,
                page_token: token,
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(p.entries.len() <= 2);
        listed.extend(
            p.entries
                .into_iter()
                .map(|e| format!("{} {}", e.ip, e.source)),
        );
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    assert_eq!(
        listed,
        [
            "1.2.3.4/32 runtime",
            "10.0.0.0/8 config",
            "10.0.0.0/8 runtime",
            "172.16.0.0/12 config",
            "192.0.2.0/24 runtime"
        ]
    );
}
