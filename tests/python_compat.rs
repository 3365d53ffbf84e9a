//! Another language's client through respite: redis-py (installed by
//! scripts/test from PyPI) exercising its own API, RESP2 and RESP3.

mod common;
use common::*;

#[test]
fn redis_py_works_unchanged() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import redis"])
        .status();
    assert!(
        matches!(have, Ok(s) if s.success()),
        "redis-py is missing: run scripts/test (it installs it) or `pip install redis`"
    );
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/compat.py");
    let out = std::process::Command::new("timeout")
        .args(["120", "python3", script, &proxy.port.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "redis-py compat failed:\nstdout: {}\nstderr: {}\nproxy log: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        proxy.log()
    );
}
