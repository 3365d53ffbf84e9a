//! AI.* commands end to end: reference key vectors, TTLs per operation read
//! from Redis itself, invalidation by SCAN, statistics, argument errors.

mod common;
use common::*;
use std::collections::BTreeMap;

fn vectors() -> Vec<serde_json::Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/ai-key-vectors.json");
    let text = std::fs::read_to_string(path).expect("shared/ai-key-vectors.json beside the repo");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["vectors"].as_array().unwrap().clone()
}

#[test]
fn every_reference_vector_through_the_proxy() {
    let redis = RedisServer::start();
    let vs = vectors();
    assert!(!vs.is_empty());
    let mut by_threshold: BTreeMap<u64, Vec<&serde_json::Value>> = BTreeMap::new();
    for v in &vs {
        by_threshold
            .entry(v["text_hash_threshold"].as_u64().unwrap())
            .or_default()
            .push(v);
    }
    let mut checked = 0;
    for (threshold, group) in by_threshold {
        let proxy = Proxy::start(
            &redis.url(),
            &["--set", &format!("ai.text_hash_threshold={threshold}")],
        );
        let mut con = proxy.conn();
        for v in group {
            let mut cmd = redis::cmd("AI.KEY");
            cmd.arg(v["operation"].as_str().unwrap())
                .arg(v["text"].as_str().unwrap());
            let opts = v["options"].as_object().unwrap();
            if !opts.is_empty() {
                cmd.arg("OPTIONS").arg(serde_json::to_string(opts).unwrap());
            }
            if let Some(q) = v["question"].as_str() {
                cmd.arg("QUESTION").arg(q);
            }
            let key: String = cmd.query(&mut con).unwrap();
            assert_eq!(key, v["key"].as_str().unwrap(), "vector {v}");
            checked += 1;
        }
    }
    assert_eq!(checked, vs.len());
}

#[test]
fn set_get_ttls_invalidate_and_stats() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "ai.operation_ttls.qa=1234"]);
    let mut c = proxy.conn();
    let mut direct = redis.conn();
    for op in [
        "summarize",
        "sentiment",
        "key_points",
        "questions",
        "qa",
        "translate",
    ] {
        let r: String = redis::cmd("AI.SET")
            .arg(op)
            .arg("some text")
            .arg(format!("answer-{op}"))
            .query(&mut c)
            .unwrap();
        assert_eq!(r, "OK");
    }
    // TTLs as configured, read from Redis directly.
    let key = |c: &mut redis::Connection, op: &str| -> String {
        redis::cmd("AI.KEY")
            .arg(op)
            .arg("some text")
            .query(c)
            .unwrap()
    };
    for (op, ttl) in [
        ("summarize", 7200),
        ("sentiment", 86400),
        ("key_points", 7200),
        ("questions", 3600),
        ("qa", 1234),
        ("translate", 3600),
    ] {
        let k = key(&mut c, op);
        let t: i64 = redis::cmd("TTL").arg(&k).query(&mut direct).unwrap();
        assert!(t <= ttl && t >= ttl - 5, "{op}: ttl {t}, want {ttl}");
    }
    // EX overrides the operation TTL.
    let _: () = redis::cmd("AI.SET")
        .arg("qa")
        .arg("t2")
        .arg("v")
        .arg("EX")
        .arg(50)
        .query(&mut c)
        .unwrap();
    let k: String = redis::cmd("AI.KEY")
        .arg("qa")
        .arg("t2")
        .query(&mut c)
        .unwrap();
    let t: i64 = redis::cmd("TTL").arg(&k).query(&mut direct).unwrap();
    assert!((45..=50).contains(&t), "{t}");
    // Round trip, with options and question.
    let _: () = redis::cmd("AI.SET")
        .arg("qa")
        .arg("doc")
        .arg("42")
        .arg("QUESTION")
        .arg("why?")
        .arg("OPTIONS")
        .arg(r#"{"model":"m1","temperature":0.5}"#)
        .query(&mut c)
        .unwrap();
    let v: Option<String> = redis::cmd("AI.GET")
        .arg("qa")
        .arg("doc")
        .arg("OPTIONS")
        .arg(r#"{"temperature":0.5,"model":"m1"}"#)
        .arg("QUESTION")
        .arg("why?")
        .query(&mut c)
        .unwrap();
    assert_eq!(v.as_deref(), Some("42"), "options order must not matter");
    let v: Option<String> = redis::cmd("AI.GET")
        .arg("qa")
        .arg("doc")
        .query(&mut c)
        .unwrap();
    assert_eq!(v, None);
    // Invalidate one operation: the others stay.
    let n: i64 = redis::cmd("AI.INVALIDATE").arg("qa").query(&mut c).unwrap();
    assert_eq!(n, 3);
    let v: Option<String> = redis::cmd("AI.GET")
        .arg("summarize")
        .arg("some text")
        .query(&mut c)
        .unwrap();
    assert_eq!(v.as_deref(), Some("answer-summarize"));
    let n: i64 = redis::cmd("AI.DEL")
        .arg("sentiment")
        .arg("some text")
        .query(&mut c)
        .unwrap();
    assert_eq!(n, 1);
    let _: () = redis::cmd("SET")
        .arg("unrelated")
        .arg("x")
        .query(&mut c)
        .unwrap();
    let n: i64 = redis::cmd("AI.INVALIDATE").arg("*").query(&mut c).unwrap();
    assert_eq!(n, 4);
    let left: i64 = redis::cmd("DBSIZE").query(&mut direct).unwrap();
    assert_eq!(left, 1, "only the unrelated key remains");
    // Stats: 2 hits (answer-summarize, 42), 1 miss.
    let stats: BTreeMap<String, String> = redis::cmd("AI.STATS").query(&mut c).unwrap();
    assert_eq!(stats["hits"], "2", "{stats:?}");
    assert_eq!(stats["misses"], "1");
    assert_eq!(stats["op:qa:misses"], "1");
    assert_eq!(stats["tier:small:hits"], "2");
    assert_eq!(stats["invalidations"], "7");
    assert!(proxy.metrics().contains("respite_ai_hits 2"));
}

#[test]
fn large_texts_hash_and_bad_arguments_error() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut c = proxy.conn();
    let text = "word ".repeat(2_000_000);
    let k: String = redis::cmd("AI.KEY")
        .arg("summarize")
        .arg(&text)
        .query(&mut c)
        .unwrap();
    assert!(
        k.starts_with("ai_cache:op:summarize|txt:hash:")
            && k.len() == "ai_cache:op:summarize|txt:hash:".len() + 16,
        "{k}"
    );
    let mut err = |args: &[&str]| -> String {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query::<redis::Value>(&mut c).unwrap_err().to_string()
    };
    assert!(err(&["AI.KEY", "op"]).contains("wrong number of arguments"));
    assert!(err(&["AI.KEY", "op", "t", "OPTIONS", "{bad"]).contains("invalid OPTIONS JSON"));
    assert!(err(&["AI.KEY", "op", "t", "OPTIONS", "[1]"]).contains("must be a JSON object"));
    assert!(err(&["AI.KEY", "op", "t", "OPTIONS", r#"{"a":{"b":1}}"#]).contains("nested"));
    assert!(err(&["AI.GET", "op", "t", "BOGUS", "x"]).contains("unknown flag"));
    assert!(err(&["AI.SET", "op", "t", "v", "EX", "0"]).contains("EX must be a positive integer"));
    assert!(err(&["AI.NOPE"]).contains("unknown AI command"));
    // The connection is fine afterwards.
    let r: String = redis::cmd("PING").query(&mut c).unwrap();
    assert_eq!(r, "PONG");
}

#[test]
fn ai_commands_in_local_mode() {
    let proxy = Proxy::start_args(&["--set".into(), "upstream.fallback=local".into()]);
    let mut c = proxy.conn();
    let _: () = redis::cmd("AI.SET")
        .arg("summarize")
        .arg("t")
        .arg("v")
        .query(&mut c)
        .unwrap();
    let v: String = redis::cmd("AI.GET")
        .arg("summarize")
        .arg("t")
        .query(&mut c)
        .unwrap();
    assert_eq!(v, "v");
    let n: i64 = redis::cmd("AI.INVALIDATE")
        .arg("summarize")
        .query(&mut c)
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn large_answers_are_compressed_and_read_back_whatever_wrote_them() {
    answers_round_trip(true);
}

#[test]
fn large_answers_round_trip_without_l1() {
    answers_round_trip(false);
}

fn answers_round_trip(l1: bool) {
    // The applications write some keys with plain SET (compressed by the
    // proxy) and read them with AI.GET, and the other way round: both must
    // see the value itself, never the stored frame.
    let redis = RedisServer::start();
    let mode = if l1 {
        "l1.mode=tracking"
    } else {
        "l1.mode=off"
    };
    let proxy = Proxy::start(&redis.url(), &["--set", mode]);
    let mut c = proxy.conn();
    let mut direct = redis.conn();
    let answer = "{\"summary\": \"the quick brown fox jumps over the lazy dog\"} ".repeat(200);
    let ai_get = |c: &mut redis::Connection, text: &str| -> Option<String> {
        redis::cmd("AI.GET")
            .arg("summarize")
            .arg(text)
            .query(c)
            .unwrap()
    };
    let key: String = redis::cmd("AI.KEY")
        .arg("summarize")
        .arg("a long text")
        .query(&mut c)
        .unwrap();
    // AI.SET stores it compressed, like SET.
    let _: () = redis::cmd("AI.SET")
        .arg("summarize")
        .arg("a long text")
        .arg(&answer)
        .query(&mut c)
        .unwrap();
    let stored: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut direct).unwrap();
    assert!(
        stored.len() < answer.len() / 2,
        "stored {} bytes for {}",
        stored.len(),
        answer.len()
    );
    for round in 0..3 {
        // The first read fills L1, the next ones hit it.
        let got = ai_get(&mut c, "a long text");
        assert!(got.as_ref() == Some(&answer), "AI.GET round {round}");
        let got: String = redis::cmd("GET").arg(&key).query(&mut c).unwrap();
        assert!(got == answer, "GET round {round}");
    }
    // AI.GET is served from L1 like GET, and still counted.
    let before = redis.calls("get");
    for _ in 0..5 {
        assert!(ai_get(&mut c, "a long text").as_ref() == Some(&answer));
    }
    if l1 {
        assert_eq!(redis.calls("get"), before, "AI.GET hits reached Redis");
    }
    let stats: BTreeMap<String, String> = redis::cmd("AI.STATS").query(&mut c).unwrap();
    assert_eq!(stats["hits"], "8", "{stats:?}");
    // A missing answer: a miss, then cached as nil, still counted a miss.
    for _ in 0..2 {
        assert_eq!(ai_get(&mut c, "another text"), None);
    }
    let stats: BTreeMap<String, String> = redis::cmd("AI.STATS").query(&mut c).unwrap();
    assert_eq!(stats["misses"], "2", "{stats:?}");
    // Written with plain SET through the proxy, read with AI.GET.
    let other = answer.replace("fox", "cat");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&other)
        .query(&mut c)
        .unwrap();
    let got = ai_get(&mut c, "a long text");
    assert!(got == Some(other), "AI.GET of a value written with SET");
}

#[test]
fn ai_writes_are_read_back_at_once_from_l1() {
    // ttl mode: no invalidation from Redis at all, so only respite's own
    // local invalidation can make a client read its AI.SET/AI.DEL.
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "l1.mode=ttl"]);
    let mut c = proxy.conn();
    let get = |c: &mut redis::Connection| -> Option<String> {
        redis::cmd("AI.GET").arg("qa").arg("text").query(c).unwrap()
    };
    assert_eq!(get(&mut c), None);
    assert_eq!(get(&mut c), None, "cached nil");
    let _: () = redis::cmd("AI.SET")
        .arg("qa")
        .arg("text")
        .arg("v1")
        .query(&mut c)
        .unwrap();
    assert_eq!(get(&mut c).as_deref(), Some("v1"), "AI.SET not read back");
    assert_eq!(get(&mut c).as_deref(), Some("v1"));
    let _: i64 = redis::cmd("AI.DEL")
        .arg("qa")
        .arg("text")
        .query(&mut c)
        .unwrap();
    assert_eq!(get(&mut c), None, "AI.DEL not read back");
    let _: () = redis::cmd("AI.SET")
        .arg("qa")
        .arg("text")
        .arg("v2")
        .query(&mut c)
        .unwrap();
    assert_eq!(get(&mut c).as_deref(), Some("v2"));
    let _: i64 = redis::cmd("AI.INVALIDATE").arg("qa").query(&mut c).unwrap();
    assert_eq!(get(&mut c), None, "AI.INVALIDATE not read back");
}

#[test]
fn ai_commands_inside_multi_keep_exec_replies_decoded() {
    // AI.SET/AI.GET inside MULTI are queued by Redis like the commands
    // they stand for: EXEC's reply has their elements, decoded, and the
    // elements of ordinary commands after them stay decoded too.
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut c = proxy.conn();
    let big = "an answer that compresses well. ".repeat(200);
    let key: String = redis::cmd("AI.KEY")
        .arg("qa")
        .arg("t")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("plain")
        .arg(&big)
        .query(&mut c)
        .unwrap();
    let (set, aiget, get): (String, String, String) = redis::pipe()
        .atomic()
        .cmd("AI.SET")
        .arg("qa")
        .arg("t")
        .arg(&big)
        .cmd("AI.GET")
        .arg("qa")
        .arg("t")
        .cmd("GET")
        .arg("plain")
        .query(&mut c)
        .unwrap();
    assert_eq!(set, "OK");
    assert!(aiget == big, "AI.GET in EXEC");
    assert!(get == big, "GET after AI.* in EXEC");
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        stored.len() < big.len() / 2,
        "AI.SET in MULTI stored it compressed"
    );
    // AI.INVALIDATE cannot be queued: a clear error, the transaction goes on.
    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    let err = redis::cmd("AI.INVALIDATE")
        .arg("qa")
        .query::<i64>(&mut c)
        .unwrap_err();
    assert!(
        err.to_string().contains("not allowed inside MULTI"),
        "{err}"
    );
    let _: String = redis::cmd("GET").arg("plain").query(&mut c).unwrap();
    let (v,): (String,) = redis::cmd("EXEC").query(&mut c).unwrap();
    assert!(v == big);
}
