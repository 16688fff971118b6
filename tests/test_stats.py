"""The report's statistics: the same figures as the slow exact ones, without their cost."""
from __future__ import annotations

import statistics

from hypothesis import given
from hypothesis import strategies as st

from blockemu.workload.fio import LAT_BUCKETS, MS_BUCKETS, JobResult, text_report
from blockemu.workload.stats import stdev


@given(st.lists(st.integers(0, 10**13), min_size=2, max_size=300))
def test_stdev_is_statistics_stdev_to_the_last_bit(values):
    assert stdev(values) == statistics.stdev(values)


def per_io_buckets(lats: list[int]) -> tuple[dict[str, float], ...]:
    """The report's latency buckets as first written: each I/O's share added to its bucket."""
    n = len(lats) or 1
    ns, us = {str(b): 0.0 for b in LAT_BUCKETS}, {str(b): 0.0 for b in LAT_BUCKETS}
    ms = {str(b): 0.0 for b in MS_BUCKETS} | {">=2000": 0.0}
    for v in lats:
        for unit, scale, buckets in ((ns, 1, LAT_BUCKETS), (us, 1000, LAT_BUCKETS), (ms, 1_000_000, MS_BUCKETS)):
            if v < 1000 * scale or unit is ms:
                b = next((b for b in buckets if v / scale <= b), None)
                unit[str(b) if b is not None else ">=2000"] += 100.0 / n
                break
    return ns, us, ms


edges = st.sampled_from([0, 2, 999, 1000, 1001, 999_999, 10**6, 2 * 10**9, 2 * 10**9 + 1])
latency = st.one_of(edges, st.integers(0, 3 * 10**9))


@given(st.lists(latency, max_size=400), st.lists(latency, max_size=50))
def test_latency_buckets_are_the_per_io_sums(reads, writes):
    r = JobResult("j", 0)
    r.dirs[0].lat, r.dirs[1].lat = reads, writes
    assert r.lat_buckets() == per_io_buckets(reads + writes)


def test_a_report_of_25k_ios_takes_no_exact_fraction_per_io(monkeypatch):
    """statistics.stdev makes a Fraction of every latency: 0.07 s per 17K, three times a
    direction in the normal output, and the buckets scanned each I/O's: ``blockemu run`` of a
    3 s 4k randwrite spent 0.3 s on its report once the job was done (0.08 s now)."""
    r = JobResult("j", 0)
    w = r.dirs[1]
    w.clat = w.lat = [1000 + (i * 7919) % 900_000 for i in range(25_000)]
    w.io_bytes, r.runtime_s, r.ios_issued = 25_000 * 4096, 1.0, 25_000

    exact = statistics.stdev

    def per_sample_only(values: list[float]) -> float:  # the bandwidth's few samples may
        assert len(values) < 100, "statistics.stdev over the latencies"
        return exact(values)

    monkeypatch.setattr(statistics, "stdev", per_sample_only)
    r.as_json([0.0, 0.0, 0.0])
    assert any("clat (nsec): min=1000, max=900967" in line for line in text_report([r], {0: [0.0, 0.0, 0.0]}))
