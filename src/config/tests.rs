//! Config errors name file, line and field path; valid configs compile to the expected rules.

use super::*;

fn parse_ok(yaml: &str) -> Config {
    match parse(yaml, "t.yaml", |_| None) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got: {e}"),
    }
}

fn parse_err(yaml: &str) -> String {
    match parse(yaml, "t.yaml", |_| None) {
        Ok(_) => panic!("expected an error for:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

const TWO_DOMAINS_BAD_UNIT: &str = "\
domains:
  - name: a
    endpoints:
      - path: /x
        limits: [1/second]
  - name: b
    endpoints:
      - path: /y
        limits:
          - 10/minute
          - 5/minuet
";

#[test]
fn unknown_unit_names_file_line_and_path() {
    assert_eq!(
        parse_err(TWO_DOMAINS_BAD_UNIT),
        "t.yaml:11: domains[1].endpoints[0].limits[1]: unknown unit \"minuet\" (second, minute, hour, day)"
    );
}

#[test]
fn unknown_fields_are_rejected_with_the_expected_ones() {
    let err = parse_err("domains:\n  - name: a\n    endpoint:\n      - path: /x\n");
    assert!(
        err.starts_with("t.yaml:3: domains[0]: unknown field `endpoint`"),
        "{err}"
    );
    assert!(err.contains("expected one of"), "{err}");
}

#[test]
fn unknown_algorithm_lists_the_known_ones() {
    let err = parse_err(
        "domains:\n  - name: a\n    endpoints:\n      - path: /x\n        limits: [{rate: 1/second, algorithm: leaky}]\n",
    );
    assert!(
        err.starts_with(
            "t.yaml:5: domains[0].endpoints[0].limits[0].algorithm: unknown variant `leaky`"
        ),
        "{err}"
    );
    assert!(
        err.contains("sliding_window") && err.contains("token_bucket"),
        "{err}"
    );
}

#[test]
fn semantic_errors_point_at_their_line() {
    let err = parse_err(
        "domains:\n  - name: a\n    endpoints:\n      - path: /x\n        limits: [1/second]\n      - path: /x/\n        limits: [1/second]\n",
    );
    assert!(
        err.starts_with("t.yaml:6: domains[0].endpoints[1].path: duplicate endpoint"),
        "{err}"
    );

    let err =
        parse_err("domains:\n  - name: a\n    endpoints:\n      - path: /x\n        burst: 3\n");
    assert_eq!(
        err,
        "t.yaml:5: domains[0].endpoints[0].burst: burst needs a refill rate too (e.g. `refill: 1/6 seconds`)"
    );

    let err = parse_err("domains:\n  - name: a\n  - name: a\n");
    assert_eq!(
        err,
        "t.yaml:3: domains[1].name: duplicate domain \"a\" (first defined at domains[0])"
    );

    let err = parse_err(
        "domains:\n  - name: a\n    endpoints:\n      - path: nope\n        limits: [1/second]\n",
    );
    assert!(
        err.starts_with("t.yaml:4: domains[0].endpoints[0].path: "),
        "{err}"
    );

    let err = parse_err("domains:\n  - name: a\n    endpoints:\n      - path: /x\n");
    assert!(
        err.starts_with("t.yaml:4: domains[0].endpoints[0]: endpoint has no limits"),
        "{err}"
    );

    let err = parse_err("store:\n  max_keys: 0\ndomains:\n  - name: a\n");
    assert_eq!(err, "t.yaml:2: store.max_keys: must be at least 1");
}

#[test]
fn syntax_errors_have_a_line() {
    let err = parse_err("domains:\n  - name: a\n   bad: [\n");
    assert!(err.starts_with("t.yaml:"), "{err}");
    assert!(
        err.split(':').nth(1).unwrap().parse::<usize>().is_ok(),
        "{err}"
    );
}

#[test]
fn missing_domains_is_an_error() {
    let err = parse_err("enabled: true\n");
    assert!(err.contains("missing field `domains`"), "{err}");
    assert_eq!(
        parse_err("domains: []\n"),
        "t.yaml:1: domains: at least one domain is required"
    );
}

#[test]
fn environment_variables_fill_in_limits_and_switches() {
    let yaml = "enabled: ${RATE_LIMIT_ENABLED:-true}\ndomains:\n  - name: a\n    endpoints:\n      - path: /x\n        limits: [\"${RATE_LIMIT_TRAINING_EXECUTE:-10/minute}\"]\n";
    let cfg = parse(yaml, "t.yaml", |n| match n {
        "RATE_LIMIT_ENABLED" => Some("false".into()),
        "RATE_LIMIT_TRAINING_EXECUTE" => Some("5/minute; 100/hour".into()),
        _ => None,
    })
    .unwrap();
    assert!(!cfg.rules.enabled);
    let limits = &cfg.rules.domains[0].rules[0].limits;
    assert_eq!(limits.len(), 2);
    assert_eq!(limits[0].rate, "5/minute");
    assert_eq!(limits[1].rate, "100/hour");

    for off in ["0", "no", "False", "OFF"] {
        let cfg = parse(yaml, "t.yaml", |n| {
            (n == "RATE_LIMIT_ENABLED").then(|| off.into())
        })
        .unwrap();
        assert!(!cfg.rules.enabled, "{off}");
    }
    let err = parse(yaml, "t.yaml", |n| {
        (n == "RATE_LIMIT_ENABLED").then(|| "maybe".into())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("t.yaml:1: enabled: expected true or false"),
        "{err}"
    );

    let err = parse(yaml, "t.yaml", |n| {
        (n == "RATE_LIMIT_TRAINING_EXECUTE").then(|| "ten/minute".into())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("t.yaml:6: domains[0].endpoints[0].limits[0]: count \"ten\""),
        "{err}"
    );
}

#[test]
fn unset_variable_without_default_is_an_error_with_its_line() {
    let err = parse_err("domains:\n  - name: ${DOMAIN}\n");
    assert!(
        err.starts_with("t.yaml:2: environment variable DOMAIN is not set"),
        "{err}"
    );
}

#[test]
fn default_config_encodes_both_seeds() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sluice.yaml"))
        .unwrap();
    let cfg = parse(&text, "config/sluice.yaml", |_| None).unwrap();
    assert!(cfg.rules.enabled);
    let training = cfg.rules.domain("training").unwrap();
    assert_eq!(training.rules.len(), 9);
    let rates: Vec<(&str, &str)> = training
        .rules
        .iter()
        .map(|r| (r.name.as_str(), r.limits[0].rate.as_str()))
        .collect();
    assert_eq!(
        rates,
        [
            ("/api/training/execute", "10/minute"),
            ("/api/training/validate", "30/minute"),
            ("/api/training/cancel/{job_id}", "30/minute"),
            ("/api/training/pause/{job_id}", "30/minute"),
            ("/api/training/resume/{job_id}", "30/minute"),
            ("/api/training/{job_id}/force-start", "30/minute"),
            ("/api/filesystem/list", "60/minute"),
            ("/api/filesystem/read", "60/minute"),
            ("/api/filesystem/info", "60/minute"),
        ]
    );
    let talk = cfg.rules.domain("talk2me").unwrap();
    let table: Vec<(String, Vec<String>)> = talk
        .rules
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                r.limits.iter().map(|l| l.rate.clone()).collect(),
            )
        })
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        table,
        [
            (
                "/transcribe".into(),
                s(&["10/minute", "100/hour", "burst 3, refill 1/6 seconds"])
            ),
            (
                "/translate".into(),
                s(&["20/minute", "300/hour", "burst 5, refill 1/3 seconds"])
            ),
            (
                "/translate/stream".into(),
                s(&["10/minute", "150/hour", "burst 3, refill 1/6 seconds"])
            ),
            (
                "/speak".into(),
                s(&["15/minute", "200/hour", "burst 3, refill 1/4 seconds"])
            ),
            ("global".into(), s(&["1000/minute", "10000/hour"])),
        ]
    );
    assert_eq!(talk.rules[0].client, ["remote_address", "user_agent"]);
    assert_eq!(training.rules[0].client, ["remote_address"]);
}

#[test]
fn limit_identity_ignores_the_count() {
    let a = parse_ok(
        "domains:\n  - name: a\n    endpoints:\n      - path: /x\n        limits: [10/minute]\n",
    );
    let b = parse_ok(
        "domains:\n  - name: a\n    endpoints:\n      - path: /x\n        limits: [20/minute]\n",
    );
    let c = parse_ok(
        "domains:\n  - name: a\n    endpoints:\n      - path: /x\n        limits: [20/hour]\n",
    );
    let id = |c: &Config| c.rules.domains[0].rules[0].limits[0].id;
    assert_eq!(id(&a), id(&b));
    assert_ne!(id(&a), id(&c));
}

#[test]
fn envoyproxy_ratelimit_test_configs_are_not_mistaken_for_ours() {
    // `parse` reads sluice's format only (`load` tells the formats apart): another format's
    // file must fail loudly, not load as an empty config.
    let text = "domain: mongo_cps\ndescriptors:\n  - key: database\n    value: users\n";
    let err = parse_err(text);
    assert!(err.contains("unknown field `domain`"), "{err}");
}

const ONE_DOMAIN: &str =
    "domains:\n  - name: d\n    endpoints:\n      - path: /a\n        limits: [1/minute]\n";

#[test]
fn store_backend_defaults_to_memory_and_redis_is_chosen_by_url_or_cluster() {
    let c = parse_ok(ONE_DOMAIN);
    assert_eq!(c.backend, Backend::Memory);
    assert_eq!(c.store.on_error, FailurePolicy::Allow);

    let c = parse_ok(&format!(
        "store:\n  url: redis://:pw@127.0.0.1:6379/2\n  timeout_ms: 80\n  on_error: deny\n  clock: local\n{ONE_DOMAIN}"
    ));
    assert_eq!(c.store.on_error, FailurePolicy::Deny);
    let Backend::Redis(o) = c.backend else {
        panic!("expected redis")
    };
    assert_eq!(
        o.nodes,
        RedisNodes::Single("redis://:pw@127.0.0.1:6379/2".into())
    );
    assert_eq!(o.timeout, Duration::from_millis(80));
    assert_eq!(o.time, TimeSource::Caller);

    let c = parse_ok(&format!(
        "store:\n  backend: redis\n  cluster: [redis://127.0.0.1:7000, redis://127.0.0.1:7001]\n{ONE_DOMAIN}"
    ));
    let Backend::Redis(o) = c.backend else {
        panic!("expected redis")
    };
    assert_eq!(o.timeout, RedisOptions::DEFAULT_TIMEOUT);
    assert_eq!(o.time, TimeSource::Redis);
    assert!(matches!(o.nodes, RedisNodes::Cluster(ref n) if n.len() == 2));
}

#[test]
fn store_backend_errors_name_the_field() {
    let e = parse_err(&format!("store:\n  backend: redis\n{ONE_DOMAIN}"));
    assert!(
        e.starts_with("t.yaml:2: store.backend: redis needs `url:"),
        "{e}"
    );
    let e = parse_err(&format!("store:\n  url: http://x:6379\n{ONE_DOMAIN}"));
    assert!(
        e.starts_with("t.yaml:2: store.url: \"http://x:6379\": expected a redis://"),
        "{e}"
    );
    let e = parse_err(&format!(
        "store:\n  cluster: [redis://a:1, nope]\n{ONE_DOMAIN}"
    ));
    assert!(e.contains("store.cluster[1]: \"nope\""), "{e}");
    let e = parse_err(&format!("store:\n  timeout_ms: 10\n{ONE_DOMAIN}"));
    assert!(
        e.contains("store.timeout_ms: only applies to `backend: redis`"),
        "{e}"
    );
    let e = parse_err(&format!(
        "store:\n  url: redis://a:1\n  on_error: maybe\n{ONE_DOMAIN}"
    ));
    assert!(e.contains("store.on_error: unknown variant `maybe`"), "{e}");
    let e = parse_err(&format!("store:\n  urll: redis://a:1\n{ONE_DOMAIN}"));
    assert!(e.contains("store: unknown field `urll`"), "{e}");
}

#[test]
fn tls_files_are_relative_to_the_config_file_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(
        &path,
        "tls:\n  grpc: { cert: tls/s.crt, key: /abs/s.key, client_ca: ca.crt }\ndomains:\n  - name: d\n",
    )
    .unwrap();
    let cfg = load_with(&path, |_| None).unwrap();
    let grpc = cfg.tls.grpc.unwrap();
    assert_eq!(grpc.cert, dir.path().join("tls/s.crt"));
    assert_eq!(grpc.key, std::path::PathBuf::from("/abs/s.key"));
    assert_eq!(grpc.client_ca, Some(dir.path().join("ca.crt")));
    assert_eq!(cfg.tls.admin, None);
    assert_eq!(
        parse_err("tls:\n  admin:\n    cert: a.crt\ndomains:\n  - name: d\n"),
        "t.yaml:3: tls.admin: missing field `key`"
    );
}

#[test]
fn an_error_at_the_end_of_an_unterminated_file_names_its_last_line() {
    // Found by the config_sluice fuzz target: libyaml reported line 2 of this one-line file.
    assert_eq!(
        parse_err("domains: ["),
        "t.yaml:1: did not find expected node content"
    );
    assert_eq!(
        parse_err("domains: [\n"),
        "t.yaml:2: did not find expected node content"
    );
}
