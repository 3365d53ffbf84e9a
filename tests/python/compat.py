"""redis-py through respite: the client's own API end to end.

Usage: compat.py PORT. Exits non-zero with a message on the first mismatch.
"""
import sys
import threading
import time

import redis

port = int(sys.argv[1])


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


for proto in (2, 3):
    r = redis.Redis(host="127.0.0.1", port=port, protocol=proto, socket_timeout=10, decode_responses=True)
    p = f"py{proto}:"
    check(r.ping(), "ping")
    r.set(p + "s", "v", ex=100)
    check(r.get(p + "s") == "v", "get")
    check(r.get(p + "s") == "v", "get (L1 hit)")
    check(r.ttl(p + "s") > 90, "ttl")
    r.hset(p + "h", mapping={"a": "1", "b": "2"})
    check(r.hgetall(p + "h") == {"a": "1", "b": "2"}, "hgetall")
    r.rpush(p + "l", "x", "y")
    check(r.lrange(p + "l", 0, -1) == ["x", "y"], "lrange")
    r.zadd(p + "z", {"m": 1.5})
    check(r.zscore(p + "z", "m") == 1.5, "zscore")
    check(r.mget(p + "s", p + "nope") == ["v", None], "mget")
    # Pipelines, transactions and WATCH.
    with r.pipeline(transaction=False) as pipe:
        for i in range(100):
            pipe.set(f"{p}k{i}", i)
            pipe.get(f"{p}k{i}")
        out = pipe.execute()
    check(out[1::2] == [str(i) for i in range(100)], "pipeline")
    with r.pipeline(transaction=True) as pipe:
        pipe.incr(p + "n").incr(p + "n")
        check(pipe.execute() == [1, 2], "multi/exec")

    def incr_watch(pipe):
        v = int(pipe.get(p + "n"))
        pipe.multi()
        pipe.set(p + "n", v + 10)

    r.transaction(incr_watch, p + "n")
    check(r.get(p + "n") == "12", "watch transaction")
    # Scripts.
    s = r.register_script("return redis.call('GET', KEYS[1])")
    check(s(keys=[p + "s"]) == "v", "script")
    # Blocking.
    check(r.blpop([p + "empty"], timeout=0.1) is None, "blpop timeout")
    # Pub/sub.
    ps = r.pubsub()
    ps.subscribe(p + "chan")
    ps.get_message(timeout=2)
    threading.Timer(0.1, lambda: redis.Redis(port=port, protocol=proto).publish(p + "chan", "hello")).start()
    deadline = time.time() + 5
    msg = None
    while time.time() < deadline:
        msg = ps.get_message(timeout=1)
        if msg and msg["type"] == "message":
            break
    check(msg is not None and msg["data"] == "hello", f"pubsub got {msg}")
    ps.close()
    # SCAN iteration.
    keys = set(r.scan_iter(match=p + "k*", count=10))
    check(len(keys) == 100, f"scan_iter found {len(keys)}")
    check("proxy_version" in r.info("proxy"), "info proxy")
    r.close()

print("redis-py compat OK")
