"""Sharded top-k on Ray (recscore.distributed) against the single-process kernel, and a model of a
100M-item catalogue over N machines built from the measured per-shard costs.

    flock /tmp/recscore-cpu.lock .venv/bin/python -m bench.distributed [--quick] [--markdown]

Measured on this machine (a local Ray cluster, ray.init(num_cpus=<cores>)): a corpus of N = 1M random
normal rows, d = 64, fp32 and int8, k = 10, split over 4 shard actors (one kernel thread each);
the single process runs `recscore.kernels.topk` over the same rows with all cores.
- latency: one query (B = 1), median of `REPEATS_1` calls, sharded vs single.
- throughput: batches of B = 64 queries, median batch time of `REPEATS_64` calls -> queries/s,
  sharded vs single (target >= 0.7x), and sharded with 2 batches in flight.
- every sharded answer is checked equal (ids and scores, bit for bit) to the single-process one.
Per-shard costs: the kernel's scan time per row with one thread over one shard's rows (B = 1, 64),
the fan-out + merge overhead of a query over S shards of a single row (S = 1, 2, 4, 8: Ray's task
round trip on one machine), and the merge alone.
Projected (not measured): a 100M-item catalogue, d = 64, over N machines like this one, one shard
each, scanning at the single process's measured whole-machine rate (ms per row at B = 1, at B = 64),
plus the measured fan-out overhead for N shards and an assumed network round trip `NET_RTT_MS`
between machines; latency = scan of 100M / N rows + overhead(N) + network; cost per query = N x
that time (B = 1), / 64 at B = 64: machine-milliseconds per query.
Raw numbers: bench/results/distributed.json.
"""
import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

K = 10
DIM = 64
SHARDS = 4
REPEATS_1 = 60
REPEATS_64 = 12
CATALOGUE = 100_000_000
MACHINES = (1, 2, 4, 8, 16, 32, 64)
NET_RTT_MS = 0.2           # assumed: one request/response between machines in one datacenter
RESULTS = Path(__file__).parent / "results" / "distributed.json"


def _median_s(fn, repeats):
    fn()   # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _same(a, b):
    return np.array_equal(a[1], b[1]) and a[0].tobytes() == b[0].tobytes()


def measure(quick=False):
    import numba
    import ray

    from recscore.distributed import ShardedIndex, merge_topk
    from recscore.kernels import cpu_info, quantize_rows, topk

    cores = os.cpu_count()
    n = 200_000 if quick else 1_000_000
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((n, DIM), dtype=np.float32)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    out = {"machine": cpu_info(), "ray": ray.__version__, "n": n, "dim": DIM, "k": K, "shards": SHARDS,
           "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cases": {}}
    try:
        for dtype in ("fp32", "int8"):
            table = quantize_rows(corpus, dtype)
            case = out["cases"][dtype] = {"corpus_mb": table.nbytes / 1e6}
            q1 = [rng.standard_normal((1, DIM), dtype=np.float32) for _ in range(8)]
            q64 = [rng.standard_normal((64, DIM), dtype=np.float32) for _ in range(4)]
            with ShardedIndex.from_array(table, SHARDS, threads=1) as index:
                same = all(_same(index.topk(q, K), topk(q, table, K)) for q in q1[:2] + q64[:2])
                case["identical"] = bool(same)
                it = iter(range(10**9))
                case["single_b1_ms"] = 1e3 * _median_s(lambda: topk(q1[next(it) % 8], table, K), REPEATS_1)
                case["sharded_b1_ms"] = 1e3 * _median_s(lambda: index.topk(q1[next(it) % 8], K), REPEATS_1)
                single64 = _median_s(lambda: topk(q64[next(it) % 4], table, K), REPEATS_64)
                sharded64 = _median_s(lambda: index.topk(q64[next(it) % 4], K), REPEATS_64)

                def two_in_flight():
                    pending = [index.search_async(q64[next(it) % 4], K) for _ in range(2)]
                    for p in pending:
                        p.result()
                pipelined = _median_s(two_in_flight, REPEATS_64 // 2) / 2
                case["single_b64_qps"] = 64 / single64
                case["sharded_b64_qps"] = 64 / sharded64
                case["sharded_b64_2_in_flight_qps"] = 64 / pipelined
                case["throughput_ratio"] = case["sharded_b64_qps"] / case["single_b64_qps"]
                case["throughput_ratio_2_in_flight"] = case["sharded_b64_2_in_flight_qps"] / case["single_b64_qps"]
                case["latency_overhead_ms"] = case["sharded_b1_ms"] - case["single_b1_ms"]
            # per-core scan cost: one kernel thread over a shard's rows in this process
            part = quantize_rows(corpus[:n // SHARDS], dtype)
            threads = numba.get_num_threads()
            numba.set_num_threads(1)
            try:
                b1 = _median_s(lambda: topk(q1[next(it) % 8], part, K), REPEATS_1 // 2)
                b64 = _median_s(lambda: topk(q64[next(it) % 4], part, K), REPEATS_64 // 2)
            finally:
                numba.set_num_threads(threads)
            case["scan_ns_per_row_b1"] = 1e9 * b1 / part.shape[0]
            case["scan_ns_per_row_query_b64"] = 1e9 * b64 / part.shape[0] / 64
        # fan-out + merge overhead: S shards of one row each (no scan to speak of)
        overhead = out["overhead_ms"] = {}
        q = rng.standard_normal((1, DIM), dtype=np.float32)
        for s in (1, 2, 4, 8):
            with ShardedIndex.from_array(corpus[:s], s, threads=1) as index:
                overhead[str(s)] = 1e3 * _median_s(lambda: index.topk(q, K), REPEATS_1)
        parts = [(np.sort(rng.standard_normal((64, K)).astype(np.float32))[:, ::-1].copy(),
                  rng.integers(0, n, (64, K))) for _ in range(64)]
        out["merge_64_shards_b64_ms"] = 1e3 * _median_s(lambda: merge_topk(parts, K, "ip"), 20)
    finally:
        ray.shutdown()
    return out


def project(measured):
    """100M items over N machines like this one, from the measured costs (see the module docstring)."""
    overhead = measured["overhead_ms"]
    slope = (overhead["8"] - overhead["1"]) / 7          # per extra shard, this machine's Ray round trips
    n = measured["n"]
    rows = []
    for dtype, case in measured["cases"].items():
        bytes_per_row = DIM * (4 if dtype == "fp32" else 1) + (8 if dtype == "int8" else 0)
        b1_ms_per_row = case["single_b1_ms"] / n                   # the whole machine's measured scan rates
        b64_ms_per_row = 64 / case["single_b64_qps"] * 1e3 / n
        for machines in MACHINES:
            per_machine = CATALOGUE / machines
            fan = overhead["1"] + slope * (machines - 1) + (NET_RTT_MS if machines > 1 else 0.0)
            scan_b1 = per_machine * b1_ms_per_row
            scan_b64 = per_machine * b64_ms_per_row
            rows.append({"dtype": dtype, "machines": machines, "gb_per_machine": per_machine * bytes_per_row / 1e9,
                         "latency_b1_ms": scan_b1 + fan, "batch64_ms": scan_b64 + fan,
                         "machine_ms_per_query_b1": machines * (scan_b1 + fan),
                         "machine_ms_per_query_b64": machines * (scan_b64 + fan) / 64})
    return {"catalogue": CATALOGUE, "dim": DIM, "cores_per_machine": measured["machine"]["cores"],
            "net_rtt_ms": NET_RTT_MS, "overhead_per_shard_ms": slope, "rows": rows}


def markdown(result):
    m = result["measured"]
    info = m["machine"]
    lines = [f"## Scale-out on Ray: {info['model'].split()[0]} {info['model'].split()[1] if len(info['model'].split()) > 1 else ''}"
             f" {info['cores']}-core, level {info['level']}".replace("  ", " "), "",
             f"_Ray {m['ray']}; measured {m['measured_at']}; N = {m['n']:,} random normal rows, d = {m['dim']}, "
             f"k = {m['k']}, {m['shards']} shard actors on this one machine (one kernel thread each) against "
             f"`recscore.kernels.topk` in one process (all cores); raw numbers `bench/results/distributed.json`, "
             f"script `bench/distributed.py`._", "",
             "**Measured.** Every sharded answer checked equal to the single-process one (ids and scores, bit for bit).", "",
             "| rows | identical | B=1 single ms | B=1 sharded ms | overhead ms | B=64 single q/s | B=64 sharded q/s | ratio (target >= 0.7) | 2 batches in flight q/s | ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype, c in m["cases"].items():
        lines.append(f"| {dtype} ({c['corpus_mb']:.0f} MB) | {'yes' if c['identical'] else 'NO'} | {c['single_b1_ms']:.2f} | "
                     f"{c['sharded_b1_ms']:.2f} | {c['latency_overhead_ms']:+.2f} | {c['single_b64_qps']:.0f} | "
                     f"{c['sharded_b64_qps']:.0f} | {c['throughput_ratio']:.2f}x | {c['sharded_b64_2_in_flight_qps']:.0f} | "
                     f"{c['throughput_ratio_2_in_flight']:.2f}x |")
    o = m["overhead_ms"]
    lines += ["", "Per-shard costs (measured): scan per row with one kernel thread over one shard's rows "
              + ", ".join(f"{d} {c['scan_ns_per_row_b1']:.2f} ns (B=1) / {c['scan_ns_per_row_query_b64']:.3f} ns per query (B=64)"
                          for d, c in m["cases"].items())
              + "; fan-out + merge of one query over S one-row shards "
              + ", ".join(f"S={s}: {v:.2f} ms" for s, v in o.items())
              + f"; the merge alone of 64 shards' k={m['k']} lists for 64 queries {m['merge_64_shards_b64_ms']:.2f} ms.", ""]
    p = result["projected"]
    lines += [f"**Projected, not measured**: {p['catalogue'] / 1e6:.0f}M items, d = {p['dim']}, one shard per machine like "
              f"this one ({p['cores_per_machine']} cores) scanning at the single process's measured rate (the table above: "
              f"ms per row at B=1, queries/s at B=64; 100M rows exceed one such machine's memory in fp32), fan-out overhead "
              f"{o['1']:.2f} ms + {p['overhead_per_shard_ms']:.3f} ms per extra shard (this machine's Ray round trips), plus "
              f"an assumed {p['net_rtt_ms']} ms network round trip once there are several machines. Cost: machine-milliseconds "
              f"per query (N x time; multiply by the price of a machine-ms).", "",
              "| rows | machines | GB per machine | B=1 latency ms | B=64 batch ms | machine-ms / query at B=1 | machine-ms / query at B=64 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in p["rows"]:
        lines.append(f"| {r['dtype']} | {r['machines']} | {r['gb_per_machine']:.1f} | {r['latency_b1_ms']:.1f} | "
                     f"{r['batch64_ms']:.1f} | {r['machine_ms_per_query_b1']:.1f} | {r['machine_ms_per_query_b64']:.2f} |")
    lines += ["", "Caveats of the projection: the scan rates come from a 1M-row corpus (256 MB fp32) that partly sits in "
              "this CPU's L3 cache; a larger share per machine streams from DRAM, so B=1 latencies (memory-bound) are "
              "lower bounds at few machines. The per-shard fan-out cost was measured with up to 8 actors sharing these "
              "2 cores, an upper bound for shards on their own machines.", "",
              "Reading: latency falls about as 1/N until the fan-out and network terms dominate; the cost per "
              "query stays about flat (each machine scans its share) and rises slowly with N (every machine pays the "
              "per-query overhead), so add machines when the catalogue stops fitting one machine's memory or when "
              "latency matters more than cost; replicas (more copies of the same shards) add throughput at flat latency."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 200k (a smoke run; not recorded)")
    parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md section of the last run")
    args = parser.parse_args(argv)
    if args.markdown:   # the projection is recomputed from the recorded measurements
        result = json.loads(RESULTS.read_text())
        result["projected"] = project(result["measured"])
        RESULTS.write_text(json.dumps(result, indent=1))
        print(markdown(result))
        return 0
    measured = measure(args.quick)
    result = {"measured": measured, "projected": project(measured)}
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
