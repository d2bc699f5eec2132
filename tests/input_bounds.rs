//! Files refused before parsing: a config file (sluice's format, a reference file, each file of a
//! reference directory) or a state file over its size bound, and YAML whose aliases expand past
//! the budget ("billion laughs"). Each refusal names the file and says why. That a test here
//! finishes at all is the proof of speed: parsed, the quadratic bomb below would take time and
//! memory quadratic in its size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use sluice::access::{AccessList, MAX_STATE_FILE_BYTES};

const MAX_STATE_BYTES: u64 = MAX_STATE_FILE_BYTES as u64;
use sluice::config::{self, guard};

/// The exponential bomb: nine levels of nine aliases each, 10⁹ strings; `prefix` makes it a
/// sluice config or a reference file.
fn billion_laughs(prefix: &str) -> String {
    let mut s = format!("{prefix}a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for w in names.windows(2) {
        let refs = vec![format!("*{}", w[0]); 9].join(", ");
        s.push_str(&format!("{}: &{} [{refs}]\n", w[1], w[1]));
    }
    s
}

/// The quadratic bomb: one anchor of 20,000 items and 20,000 aliases to it (260 KB, 4×10⁸
/// strings), which serde_yaml's own repetition limit lets through.
fn quadratic(prefix: &str) -> String {
    let n = 20_000;
    let mut s = format!("{prefix}a: &a\n");
    s.push_str(&"  - x\n".repeat(n));
    s.push_str("b:\n");
    s.push_str(&"  - *a\n".repeat(n));
    s
}

fn load_err(path: &Path) -> String {
    match config::load_with(path, |_| None) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_alias_refusal(err: &str, file: &Path) {
    assert!(
        err.starts_with(&format!("{}: ", file.display())),
        "names the file: {err}"
    );
    assert!(err.contains("excessive aliasing"), "says why: {err}");
}

#[test]
fn alias_bombs_in_a_sluice_config_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    // `domains:` first: the file is read as sluice's format.
    for text in [billion_laughs("domains: []\n"), quadratic("domains: []\n")] {
        std::fs::write(&path, text).unwrap();
        assert_alias_refusal(&load_err(&path), &path);
    }
}

#[test]
fn alias_bombs_in_reference_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.yaml");
    for text in [billion_laughs("domain: d\n"), quadratic("domain: d\n")] {
        std::fs::write(&path, text).unwrap();
        let err = load_err(&path);
        assert_alias_refusal(&err, &path);
        assert!(
            err.contains("error loading config file: yaml:"),
            "in the reference's words: {err}"
        );
    }
}

#[test]
fn an_alias_bomb_in_one_file_of_a_reference_directory_refuses_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        "domain: a\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
    )
    .unwrap();
    let bomb = dir.path().join("b.yaml");
    std::fs::write(&bomb, quadratic("domain: b\n")).unwrap();
    assert_alias_refusal(&load_err(dir.path()), &bomb);
}

#[test]
fn anchors_that_reuse_a_block_of_limits_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(
        &path,
        "domains:\n  - name: a\n    endpoints:\n      - path: /x\n        limits: &std [10/minute, 100/hour]\n      - path: /y\n        limits: *std\n",
    )
    .unwrap();
    let cfg = config::load_with(&path, |_| None).unwrap();
    assert_eq!(cfg.rules.domains[0].rules[1].limits.len(), 2);
}

/// A file of `size` bytes without writing them (sparse): the bound is checked on its size.
fn sized_file(path: &Path, head: &str, size: u64) {
    std::fs::write(path, head).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(size)
        .unwrap();
}

#[test]
fn config_files_over_the_size_bound_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let max = guard::MAX_FILE_BYTES;
    let native = dir.path().join("sluice.yaml");
    sized_file(&native, "domains:\n", max + 1);
    assert_eq!(
        load_err(&native),
        format!(
            "{}: refused before parsing: {} bytes, over the bound of {max} bytes on a config file",
            native.display(),
            max + 1
        )
    );
    // One file of a reference directory over the bound refuses the directory.
    let refdir = dir.path().join("ref");
    std::fs::create_dir(&refdir).unwrap();
    std::fs::write(refdir.join("a.yaml"), "domain: a\n").unwrap();
    let big = refdir.join("b.yaml");
    sized_file(&big, "domain: b\n", max + 1);
    let err = load_err(&refdir);
    assert!(
        err.starts_with(&format!("{}: refused before parsing", big.display())),
        "{err}"
    );
}

#[test]
fn a_config_file_at_the_size_bound_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    let head =
        "domains:\n  - name: a\n    endpoints:\n      - path: /x\n        limits: [1/second]\n";
    // Padded to the bound with a comment.
    let pad = guard::MAX_FILE_BYTES as usize - head.len() - 2;
    std::fs::write(&path, format!("{head}#{}\n", "x".repeat(pad))).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        guard::MAX_FILE_BYTES
    );
    config::load_with(&path, |_| None).unwrap();
}

#[test]
fn a_state_file_over_the_size_bound_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    sized_file(&path, "{", MAX_STATE_BYTES + 1);
    let err = AccessList::open(Some(path.clone()), Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("state file {} is damaged", path.display())),
        "names the file: {err}"
    );
    assert!(
        err.contains(&format!(
            "{} bytes, more than the {MAX_STATE_BYTES} a state file may hold; refused unread",
            MAX_STATE_BYTES + 1
        )),
        "says why: {err}"
    );
}
