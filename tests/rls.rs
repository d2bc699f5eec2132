//! ShouldRateLimit over the wire: the seeds' tables, every request field Envoy sends, and every
//! status field Envoy reads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use sluice::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_response::DescriptorStatus;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use tonic::Code as GrpcCode;

/// Asserts every field of a status.
fn assert_status(
    s: &DescriptorStatus,
    code: i32,
    name: &str,
    rpu: u32,
    unit: Unit,
    remaining: u32,
    reset_secs: i64,
) {
    assert_eq!(s.code, code, "code of {s:?}");
    let limit = s.current_limit.as_ref().expect("current_limit");
    assert_eq!(limit.name, name);
    assert_eq!(limit.requests_per_unit, rpu);
    assert_eq!(limit.unit, unit as i32);
    assert_eq!(s.limit_remaining, remaining, "remaining of {s:?}");
    let d = s
        .duration_until_reset
        .as_ref()
        .expect("duration_until_reset");
    assert_eq!((d.seconds, d.nanos), (reset_secs, 0), "reset of {s:?}");
}

#[tokio::test]
async fn eleventh_execute_in_a_minute_is_over_limit() {
    let srv = TestServer::start_default().await;
    for i in 0..10u32 {
        let r = srv
            .call(training("/api/training/execute", "10.0.0.1"))
            .await;
        assert_eq!(r.overall_code, OK, "request {}", i + 1);
        assert_eq!(r.statuses.len(), 1);
        assert_status(
            &r.statuses[0],
            OK,
            "per minute",
            10,
            Unit::Minute,
            9 - i,
            60 - i64::from(i),
        );
        assert!(r.response_headers_to_add.is_empty() && r.raw_body.is_empty());
        srv.advance(1);
    }
    // At T0+10s: the window holds 10; with the weighted window the 11th is admitted once the
    // 10 hits of this minute have faded to 9 in the next one: 50 s + 6 s from now.
    let r = srv
        .call(training("/api/training/execute", "10.0.0.1"))
        .await;
    assert_eq!(r.overall_code, OVER);
    assert_status(&r.statuses[0], OVER, "per minute", 10, Unit::Minute, 0, 56);
    assert_eq!(header(&r, "retry-after"), Some("56"));
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    assert_eq!(
        String::from_utf8(r.raw_body).unwrap(),
        r#"{"error": "Rate limit exceeded (per minute)", "retry_after": 56}"#
    );

    // Another client is unaffected.
    let other = srv
        .call(training("/api/training/execute", "10.0.0.2"))
        .await;
    assert_eq!(other.overall_code, OK);
    assert_eq!(other.statuses[0].limit_remaining, 9);

    // The promise holds: still limited a second early, admitted on time.
    srv.advance(55);
    let early = srv
        .call(training("/api/training/execute", "10.0.0.1"))
        .await;
    assert_eq!(early.overall_code, OVER);
    srv.advance(1);
    let on_time = srv
        .call(training("/api/training/execute", "10.0.0.1"))
        .await;
    assert_eq!(on_time.overall_code, OK);
}

#[tokio::test]
async fn training_tables_match_the_seed() {
    let srv = TestServer::start_default().await;
    let cases = [
        ("/api/training/execute", 10),
        ("/api/training/validate", 30),
        ("/api/training/cancel/job-1", 30),
        ("/api/training/pause/job-1", 30),
        ("/api/training/resume/job-1", 30),
        ("/api/training/job-1/force-start", 30),
        ("/api/filesystem/list", 60),
        ("/api/filesystem/read", 60),
        ("/api/filesystem/info", 60),
    ];
    for (path, limit) in cases {
        let r = srv.call(training(path, "10.1.1.1")).await;
        assert_status(
            &r.statuses[0],
            OK,
            "per minute",
            limit,
            Unit::Minute,
            limit - 1,
            60,
        );
    }
}

#[tokio::test]
async fn job_ids_share_the_clients_counter() {
    let srv = TestServer::start_default().await;
    for i in 0..30 {
        let r = srv
            .call(training(
                &format!("/api/training/cancel/job-{i}"),
                "10.0.0.9",
            ))
            .await;
        assert_eq!(r.overall_code, OK, "cancel {i}");
    }
    let r = srv
        .call(training("/api/training/cancel/another-job", "10.0.0.9"))
        .await;
    assert_eq!(r.overall_code, OVER);
    // The query string is not part of the endpoint either.
    let r = srv
        .call(training("/api/training/cancel/x?force=1", "10.0.0.9"))
        .await;
    assert_eq!(r.overall_code, OVER);
}

#[tokio::test]
async fn talk2me_transcribe_allows_a_burst_of_three_then_one_per_six_seconds() {
    let srv = TestServer::start_default().await;
    let ua = "curl/8.0";
    for (i, reset) in [(0u32, 6i64), (1, 12), (2, 18)] {
        let r = srv.call(talk2me("/transcribe", "10.2.0.1", ua)).await;
        assert_eq!(r.overall_code, OK, "burst request {}", i + 1);
        // The bucket is closest to running out: 3 tokens, refilled at 10 per minute.
        assert_status(&r.statuses[0], OK, "burst", 10, Unit::Minute, 2 - i, reset);
    }
    let r = srv.call(talk2me("/transcribe", "10.2.0.1", ua)).await;
    assert_eq!(r.overall_code, OVER);
    assert_status(&r.statuses[0], OVER, "burst", 10, Unit::Minute, 0, 6);
    assert_eq!(header(&r, "retry-after"), Some("6"));
    assert_eq!(
        String::from_utf8(r.raw_body).unwrap(),
        r#"{"error": "Rate limit exceeded (burst)", "retry_after": 6}"#
    );
    // The same address with another user agent is another client.
    let other = srv
        .call(talk2me("/transcribe", "10.2.0.1", "Firefox"))
        .await;
    assert_eq!(other.overall_code, OK);

    srv.advance(6);
    let r = srv.call(talk2me("/transcribe", "10.2.0.1", ua)).await;
    assert_eq!(r.overall_code, OK);
    assert_status(&r.statuses[0], OK, "burst", 10, Unit::Minute, 0, 18);
}

#[tokio::test]
async fn talk2me_per_minute_limit_applies_after_the_burst_refills() {
    let srv = TestServer::start_default().await;
    // One request every 6 s keeps the bucket from emptying: the 10/minute window decides.
    let mut admitted = 0;
    for _ in 0..12 {
        let r = srv.call(talk2me("/transcribe", "10.2.0.2", "ua")).await;
        if r.overall_code == OK {
            admitted += 1;
        } else {
            assert_eq!(
                r.statuses[0].current_limit.as_ref().unwrap().name,
                "per minute"
            );
        }
        srv.advance(5);
    }
    // 12 requests within 60 s (T0..T0+55): the minute allows 10.
    assert_eq!(admitted, 10);
}

#[tokio::test]
async fn a_denied_request_charges_none_of_its_limits() {
    let srv = TestServer::start(
        "domains:\n  - name: d\n    endpoints:\n      - path: /a\n        limits: [2/minute]\n      - path: /b\n        limits: [5/minute]\n",
    )
    .await;
    let both = || {
        request(
            "d",
            vec![
                descriptor(&[("path", "/a"), ("remote_address", "1.1.1.1")]),
                descriptor(&[("path", "/b"), ("remote_address", "1.1.1.1")]),
            ],
        )
    };
    for _ in 0..2 {
        assert_eq!(srv.call(both()).await.overall_code, OK);
    }
    let r = srv.call(both()).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(r.statuses[0].code, OVER);
    // /b is fine and reports what it has left without this request: 5 - 2.
    assert_eq!(r.statuses[1].code, OK);
    assert_eq!(r.statuses[1].limit_remaining, 3);
    let only_b = srv
        .call(request(
            "d",
            vec![descriptor(&[("path", "/b"), ("remote_address", "1.1.1.1")])],
        ))
        .await;
    assert_eq!(
        only_b.statuses[0].limit_remaining, 2,
        "the denied request did not count"
    );
}

#[tokio::test]
async fn hits_addend_counts_as_envoy_defines_it() {
    let srv = TestServer::start(
        "domains:\n  - name: d\n    endpoints:\n      - path: /a\n        limits: [10/minute]\n",
    )
    .await;
    let d = || descriptor(&[("path", "/a"), ("remote_address", "1.1.1.1")]);
    // Request-level hits_addend: 4 hits.
    let mut req = request("d", vec![d()]);
    req.hits_addend = 4;
    assert_eq!(srv.call(req).await.statuses[0].limit_remaining, 6);
    // Descriptor-level 0: check without consuming, overriding the request's 4.
    let mut check = d();
    check.hits_addend = Some(0);
    let mut req = request("d", vec![check]);
    req.hits_addend = 4;
    assert_eq!(srv.call(req).await.statuses[0].limit_remaining, 6);
    // Request hits_addend 0 means 1.
    assert_eq!(
        srv.call(request("d", vec![d()])).await.statuses[0].limit_remaining,
        5
    );
    // Descriptor-level 3 overrides a request-level 7.
    let mut three = d();
    three.hits_addend = Some(3);
    let mut req = request("d", vec![three]);
    req.hits_addend = 7;
    assert_eq!(srv.call(req).await.statuses[0].limit_remaining, 2);
    // More hits than remain: over, nothing charged.
    let mut many = d();
    many.hits_addend = Some(5);
    let r = srv.call(request("d", vec![many])).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(r.statuses[0].limit_remaining, 2);
    // is_negative_hits gives hits back.
    let mut back = d();
    back.hits_addend = Some(2);
    back.is_negative_hits = true;
    let r = srv.call(request("d", vec![back])).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].limit_remaining, 4);
}

#[tokio::test]
async fn limit_override_replaces_the_configured_limit() {
    let srv = TestServer::start_default().await;
    let with_override = || {
        let mut req = training("/api/training/execute", "10.3.0.1");
        req.descriptors[0].limit = Some(RateLimitOverride {
            requests_per_unit: 2,
            // envoy.type.v3.RateLimitUnit.HOUR = 3 (same number as the response's HOUR).
            unit: 3,
        });
        req
    };
    for remaining in [1, 0] {
        let r = srv.call(with_override()).await;
        assert_status(
            &r.statuses[0],
            OK,
            "override",
            2,
            Unit::Hour,
            remaining,
            3600,
        );
    }
    let r = srv.call(with_override()).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        2
    );
    // The configured 10/minute counter was never touched.
    let plain = srv
        .call(training("/api/training/execute", "10.3.0.1"))
        .await;
    assert_status(
        &plain.statuses[0],
        OK,
        "per minute",
        10,
        Unit::Minute,
        9,
        60,
    );
}

#[tokio::test]
async fn month_override_is_reported_in_months() {
    let srv = TestServer::start_default().await;
    let mut req = training("/api/training/execute", "10.3.0.2");
    // envoy.type.v3.RateLimitUnit.MONTH = 5; the response's MONTH is also 5 (WEEK is 7).
    req.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 100,
        unit: 5,
    });
    let r = srv.call(req).await;
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.unit),
        (100, Unit::Month as i32)
    );
}

#[tokio::test]
async fn unknown_domain_and_unmatched_path_answer_ok_without_a_limit() {
    let srv = TestServer::start_default().await;
    for req in [
        training("/api/training/execute", "1.2.3.4").tap(|r| r.domain = "nope".into()),
        training("/not/limited", "1.2.3.4"),
    ] {
        let r = srv.call(req).await;
        assert_eq!(r.overall_code, OK);
        assert_eq!(r.statuses.len(), 1);
        assert_eq!(r.statuses[0].code, OK);
        assert!(r.statuses[0].current_limit.is_none());
        assert!(r.statuses[0].duration_until_reset.is_none());
    }
}

#[tokio::test]
async fn statuses_follow_descriptor_order() {
    let srv = TestServer::start_default().await;
    let req = request(
        "training",
        vec![
            descriptor(&[("path", "/nothing"), ("remote_address", "1.1.1.1")]),
            descriptor(&[
                ("path", "/api/filesystem/read"),
                ("remote_address", "1.1.1.1"),
            ]),
            descriptor(&[
                ("path", "/api/training/execute"),
                ("remote_address", "1.1.1.1"),
            ]),
        ],
    );
    let r = srv.call(req).await;
    assert_eq!(r.statuses.len(), 3);
    assert!(r.statuses[0].current_limit.is_none());
    assert_eq!(
        r.statuses[1]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        60
    );
    assert_eq!(
        r.statuses[2]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        10
    );
}

#[tokio::test]
async fn global_limit_is_shared_by_all_clients_and_counted_once_per_request() {
    let srv = TestServer::start(
        "domains:\n  - name: g\n    global: [3/minute]\n    endpoints:\n      - path: /a\n        limits: [100/minute]\n",
    )
    .await;
    let req = |ip: &str| {
        request(
            "g",
            vec![descriptor(&[("path", "/a"), ("remote_address", ip)])],
        )
    };
    // Two descriptors in one request count once against the global limit.
    let two = request(
        "g",
        vec![
            descriptor(&[("path", "/a"), ("remote_address", "1.0.0.1")]),
            descriptor(&[("path", "/other"), ("remote_address", "1.0.0.1")]),
        ],
    );
    let r = srv.call(two).await;
    assert_status(&r.statuses[1], OK, "per minute", 3, Unit::Minute, 2, 60);
    // Paths without endpoint limits count too; clients share the limit.
    assert_eq!(srv.call(req("1.0.0.2")).await.overall_code, OK);
    let r = srv.call(req("1.0.0.3")).await;
    assert_status(&r.statuses[0], OK, "per minute", 3, Unit::Minute, 0, 60);
    let r = srv.call(req("1.0.0.4")).await;
    assert_eq!(r.overall_code, OVER);
    // A minute and a bit later (the weighted window needs the old hits to fade) it passes again.
    srv.advance(61 + 20);
    assert_eq!(srv.call(req("1.0.0.4")).await.overall_code, OK);
}

#[tokio::test]
async fn disabled_rate_limiting_answers_ok_but_keeps_counting() {
    let srv = TestServer::start(
        "enabled: false\ndomains:\n  - name: d\n    endpoints:\n      - path: /a\n        limits: [2/minute]\n",
    )
    .await;
    let req = || {
        request(
            "d",
            vec![descriptor(&[("path", "/a"), ("remote_address", "1.1.1.1")])],
        )
    };
    let remaining: Vec<u32> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let r = srv.call(req()).await;
            assert_eq!(r.overall_code, OK);
            assert!(r.raw_body.is_empty());
            v.push(r.statuses[0].limit_remaining);
        }
        v
    };
    assert_eq!(remaining, [1, 0, 0, 0]);
}

#[tokio::test]
async fn fixed_window_algorithm_resets_at_the_aligned_boundary() {
    let srv = TestServer::start(
        "domains:\n  - name: d\n    endpoints:\n      - path: /a\n        limits: [{rate: 2/minute, algorithm: fixed_window, name: per-ip}]\n",
    )
    .await;
    let req = || {
        request(
            "d",
            vec![descriptor(&[("path", "/a"), ("remote_address", "1.1.1.1")])],
        )
    };
    srv.advance(50);
    srv.call(req()).await;
    srv.call(req()).await;
    let r = srv.call(req()).await;
    assert_status(&r.statuses[0], OVER, "per-ip", 2, Unit::Minute, 0, 10);
    srv.advance(10);
    let r = srv.call(req()).await;
    assert_status(&r.statuses[0], OK, "per-ip", 2, Unit::Minute, 1, 60);
}

#[tokio::test]
async fn window_of_thirty_seconds_is_reported_per_minute_with_exact_reset() {
    let srv = TestServer::start(
        "domains:\n  - name: d\n    endpoints:\n      - path: /a\n        limits: [5/30 seconds]\n",
    )
    .await;
    let req = || {
        request(
            "d",
            vec![descriptor(&[("path", "/a"), ("remote_address", "1.1.1.1")])],
        )
    };
    srv.advance(20);
    let r = srv.call(req()).await;
    assert_status(&r.statuses[0], OK, "per 30 seconds", 5, Unit::Minute, 4, 10);
}

#[tokio::test]
async fn sub_second_resets_round_up() {
    let srv = TestServer::start_default().await;
    srv.advance_millis(59_500);
    let r = srv
        .call(training("/api/training/execute", "10.9.0.1"))
        .await;
    // 0.5 s left in the window: reported as 1 s, never 0.
    assert_eq!(
        r.statuses[0].duration_until_reset.as_ref().unwrap().seconds,
        1
    );
}

async fn assert_invalid(
    srv: &TestServer,
    req: sluice::proto::envoy::service::ratelimit::v3::RateLimitRequest,
    field: &str,
) {
    let status = srv.call_err(req).await;
    assert_eq!(status.code(), GrpcCode::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(field),
        "message {:?} should name {field}",
        status.message()
    );
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_naming_the_field() {
    let srv = TestServer::start_default().await;
    let ok = || training("/api/training/execute", "1.1.1.1");
    assert_invalid(
        &srv,
        ok().tap(|r| r.domain.clear()),
        "domain: must not be empty",
    )
    .await;
    assert_invalid(
        &srv,
        ok().tap(|r| r.descriptors.clear()),
        "descriptors: at least one",
    )
    .await;
    assert_invalid(
        &srv,
        ok().tap(|r| r.descriptors = vec![r.descriptors[0].clone(); 65]),
        "descriptors: 65 descriptors, at most 64",
    )
    .await;
    assert_invalid(
        &srv,
        ok().tap(|r| r.descriptors.push(descriptor(&[]))),
        "descriptors[1].entries: at least one entry",
    )
    .await;
    let many: Vec<(String, String)> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_invalid(
        &srv,
        ok().tap(|r| r.descriptors[0] = descriptor(&many)),
        "descriptors[0].entries: 33 entries, at most 32",
    )
    .await;
    assert_invalid(
        &srv,
        ok().tap(|r| r.descriptors[0].entries[1].key.clear()),
        "descriptors[0].entries[1].key: must not be empty",
    )
    .await;
    let long = "x".repeat(1025);
    assert_invalid(
        &srv,
        ok().tap(|r| r.descriptors[0].entries[0].key = long.clone()),
        "descriptors[0].entries[0].key: 1025 bytes",
    )
    .await;
    assert_invalid(
        &srv,
        ok().tap(|r| r.descriptors[0].entries[1].value = long.clone()),
        "descriptors[0].entries[1].value: 1025 bytes",
    )
    .await;
    assert_invalid(
        &srv,
        ok().tap(|r| {
            r.descriptors[0].limit = Some(RateLimitOverride {
                requests_per_unit: 1,
                unit: 0,
            })
        }),
        "descriptors[0].limit.unit",
    )
    .await;
    // Exactly at the bounds is fine.
    let r = srv
        .call(ok().tap(|r| r.descriptors[0].entries[1].value = "y".repeat(1024)))
        .await;
    assert_eq!(r.overall_code, OK);
}

#[tokio::test]
async fn overall_code_is_never_unknown() {
    let srv = TestServer::start_default().await;
    for i in 0..40 {
        let r = srv
            .call(training("/api/training/execute", "10.7.0.1"))
            .await;
        assert!(
            r.overall_code == OK || r.overall_code == OVER,
            "call {i}: {r:?}"
        );
        assert!(r.statuses.iter().all(|s| s.code == OK || s.code == OVER));
    }
}

#[tokio::test]
async fn server_stops_gracefully() {
    let srv = TestServer::start_default().await;
    assert_eq!(srv.call(training("/a", "1.1.1.1")).await.overall_code, OK);
    srv.stop().await;
}

/// Small builder helper: mutate a value in place and return it.
trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl<T> Tap for T {}
