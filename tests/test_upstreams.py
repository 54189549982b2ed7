"""The upstream pool with plain values: balancing, ejection, probes (no sockets, no clock)."""

from __future__ import annotations

from server.inference.upstreams import Health, UpstreamPool


def test_picks_the_fewest_outstanding_and_ties_go_to_the_first_listed() -> None:
    pool = UpstreamPool(["http://a/v1", "http://b/v1", "http://c/v1"], eject_seconds=10.0)
    a, b, c = pool.upstreams
    picked = []
    for _ in range(5):
        upstream = pool.pick(0.0)
        assert upstream is not None
        pool.begin(upstream)
        picked.append(upstream.url[7])
    assert picked == ["a", "b", "c", "a", "b"]
    pool.end(b)
    pool.end(b)
    assert pool.pick(0.0) is b  # b has none in flight now
    assert pool.pick(0.0, exclude=[b]) is c
    assert (a.requests, b.requests, c.requests, pool.outstanding) == (2, 2, 1, 3)


def test_a_failing_upstream_is_left_out_until_a_probe_is_due() -> None:
    pool = UpstreamPool(["http://a/v1", "http://b/v1"], eject_seconds=10.0)
    a, b = pool.upstreams
    assert pool.due(0.0) == [a, b]  # never probed
    pool.succeed(a)
    pool.succeed(b)
    pool.fail(a, 100.0, "ConnectError")
    assert a.health is Health.EJECTED and pool.pick(101.0) is b and pool.healthy == 1
    assert pool.due(109.9) == [] and pool.next_due() == 110.0 and pool.retry_after(105.0) == 5.0
    assert pool.due(110.0) == [a]
    pool.fail(a, 110.0, "probe: HTTP 503")  # still down: out for another period, counted once
    assert a.failures == 1 and pool.next_due() == 120.0
    assert pool.summary() == "1/2 upstreams healthy; http://a/v1 ejected: probe: HTTP 503"
    pool.fail(b, 111.0, "HTTP 500")
    assert pool.pick(111.0) is None and not pool.usable
    pool.succeed(a)
    assert pool.pick(112.0) is a and a.reason == "" and pool.usable
