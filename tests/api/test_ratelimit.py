"""The per-user token bucket, on a fake clock."""

from api.ratelimit import RateLimiter


def test_burst_then_the_rate_and_the_wait_it_announces() -> None:
    rl = RateLimiter(rate_per_s=2.0, burst=3)
    assert [rl.take("u", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("u", now=0.0) == 0.5          # one token every half second
    assert rl.take("other", now=0.0) == 0.0      # per key
    assert rl.take("u", now=0.5) == 0.0
    assert rl.take("u", now=0.5) == 0.5
    assert [rl.take("u", now=100.0) for _ in range(4)][-1] > 0   # refills to the burst, not beyond


def test_full_buckets_are_forgotten_when_there_are_too_many() -> None:
    rl = RateLimiter(rate_per_s=1.0, burst=1, max_keys=10)
    for i in range(10):
        rl.take(f"k{i}", now=0.0)
    rl.take("late", now=5.0)
    assert len(rl._buckets) == 1 and "late" in rl._buckets
