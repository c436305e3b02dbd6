"""The measuring protocol of BENCHMARKING.md, in one place.

A comparison times recscore ("ours") against a named peer on the same inputs: both sides
warm up on every input set, then run alternately (A, B, A, B, ...) over rotated input sets;
the result is the median of the per-pair ratios peer_time / ours_time (> 1: we are faster)
with its min and max. `run_group` runs a group's comparisons, writes
bench/results/<group>[-<cpu level>].json and regenerates bench/RESULTS.md (bench/report.py).

A group is a module `bench/compare_<group>.py` with `comparisons(quick: bool)`, a generator
of `Comparison`s (a generator, so each case's big inputs are built and freed in turn).
"""
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

from bench.report import markdown_table
from bench.report import write as write_results_md

# Two OpenMP runtimes live in one benchmark process (Numba's and torch's; FAISS brings a
# third). With the default active wait, each runtime's idle threads spin after its call and
# steal the two cores from the other side's next call, a cross-talk that only alternating
# A/B timing creates. Passive waiting for every side removes it; set OMP_WAIT_POLICY=ACTIVE
# before running to measure with spinning. Must be set before any runtime starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# With recscore capped below the machine's level (RECSCORE_CPU), the peers are capped to the same
# instructions, so that the run stands in for a machine of that level: FBGEMM (torch's int8 Linear and
# EmbeddingBag), ATen, oneDNN, MKL and FAISS's runtime dispatch each read one variable at load.
PEER_CAPS = {
    "avx2": {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "FAISS_SIMD_LEVEL": "AVX2"},
    "avx512": {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
for _name, _value in PEER_CAPS.get(os.environ.get("RECSCORE_CPU", "").lower(), {}).items():
    os.environ.setdefault(_name, _value)

BENCH_DIR = Path(__file__).resolve().parent
THREADS = 2


@dataclasses.dataclass
class Comparison:
    name: str                           # the case, e.g. "large R=2M D=64 fp32"
    ours: str                           # what runs on our side, e.g. "recscore cpu int8"
    peer: str                           # the named peer, e.g. "torch.nn.EmbeddingBag fp32"
    run_ours: Callable[[int], object]   # run one call on input set i
    run_peer: Callable[[int], object]
    n_sets: int = 8                     # rotated input sets
    pairs: int = 24                     # timed A/B pairs (each pair uses input set pair % n_sets)
    target: Optional[float] = None      # the speedup the issue asks for, if any
    bytes_per_call: Optional[float] = None  # bytes our call must move, for a GB/s column
    note: str = ""
    device: str = "cpu"                 # "cuda": timed with CUDA events (see _timed_cuda)


def set_threads(n=THREADS):
    """Same threads for everyone: torch, Numba, FAISS and OpenMP."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import numba
    numba.set_num_threads(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def _timed(fn, i):
    start = time.perf_counter()
    fn(i)
    return time.perf_counter() - start


def _timed_cuda(fn, i, n_sets):
    """One GPU call takes microseconds: time a pass over all n_sets input sets (starting at set i)
    between two CUDA events, so that no call reads another's data from L2, and return the mean
    per call. Host-side work inside fn (validation, syncs) counts: the GPU idles through it."""
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for j in range(n_sets):
        fn((i + j) % n_sets)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / n_sets


def quantize_in_slices(rows_of, n_rows, dtype, slice_rows=1 << 16):
    """quantize_rows of the float32 rows rows_of(start, stop) for [0, n_rows), one slice at a time,
    as one host RowTable: the whole float table never exists at once (nor quantize_rows's float64
    reference copy of it: 1M x 384 would be 3 GB)."""
    import numpy as np
    from recscore.kernels import RowTable, quantize_rows
    parts = [quantize_rows(rows_of(start, min(start + slice_rows, n_rows)), dtype)
             for start in range(0, n_rows, slice_rows)]
    dim = parts[0].shape[1]
    return RowTable(dtype, (n_rows, dim), *(np.concatenate(a) for a in zip(*[(p.data, p.scale, p.bias) for p in parts])))


def cuda_graph_of(run, n_sets):
    """A CUDA graph of run(0) .. run(n_sets - 1), captured after one warm-up pass (autotuning and
    compiling stay out of it); returns a callable that replays it (its argument is ignored), for
    timing the GPU's own time without Python or launch gaps."""
    import torch
    for i in range(n_sets):
        run(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_sets):
            run(i)
    return lambda i=0: graph.replay()


def graph_time_us(run, n_sets, repeats=20):
    """The GPU's time per call of run(0) .. run(n_sets - 1) in microseconds: the median of `repeats`
    event-timed replays of their CUDA graph (cuda_graph_of), divided by n_sets."""
    import torch
    replay = cuda_graph_of(run, n_sets)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_sets)
    return statistics.median(times)


def device_copy_gbps(n_bytes=1 << 30, repeats=20):
    """The GPU's copy ceiling in this run: bytes read plus written per second by a device-to-device
    copy of n_bytes, median of `repeats` event-timed copies."""
    import torch
    src = torch.randn(n_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n_bytes / statistics.median(times) / 1e9


def measure(c: Comparison):
    """Warm up on every set, then alternate ours/peer; median pair ratio with min and max."""
    for i in range(c.n_sets):
        c.run_ours(i)
        c.run_peer(i)
    if c.device == "cuda":
        timed = lambda fn, i: _timed_cuda(fn, i, c.n_sets)  # noqa: E731
    else:
        timed = _timed
    ours, peer, ratios = [], [], []
    for p in range(c.pairs):
        i = p % c.n_sets
        if p % 2 == 0:
            a, b = timed(c.run_ours, i), timed(c.run_peer, i)
        else:  # alternate who goes first too
            b, a = timed(c.run_peer, i), timed(c.run_ours, i)
        ours.append(a)
        peer.append(b)
        ratios.append(b / a)
    row = {
        "name": c.name, "ours": c.ours, "peer": c.peer, "pairs": c.pairs, "n_sets": c.n_sets,
        "ours_median_ms": statistics.median(ours) * 1e3,
        "peer_median_ms": statistics.median(peer) * 1e3,
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "target": c.target, "note": c.note,
    }
    if c.bytes_per_call:
        row["ours_gbps"] = c.bytes_per_call / statistics.median(ours) / 1e9
    row["met"] = None if c.target is None else row["ratio_median"] >= c.target
    return row


def machine_info():
    import numpy
    info = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": numpy.__version__, "threads": THREADS,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    from recscore.kernels import cpu_info
    cpu = cpu_info()
    info["cpu_model"], info["cpu_level"], info["cpu_detected"] = cpu["model"], cpu["level"], cpu["detected"]
    for mod in ("numba", "torch", "triton", "faiss"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    info["peer_caps"] = {name: os.environ[name] for name in sorted({n for caps in PEER_CAPS.values() for n in caps})
                         if name in os.environ}
    try:
        import torch
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        import faiss
        info["faiss_simd_level"] = faiss.SIMDConfig.get_level_name()
    except (ImportError, AttributeError):
        pass
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def result_name(group, info):
    """CPU groups are recorded once per kernel level (RECSCORE_CPU caps it): `<group>-<level>`."""
    return group if "copy_gbps" in info or group.startswith("gpu_") else f"{group}-{info['cpu_level']}"


def run_group(group, quick=False, write=True, only=None):
    """Run bench/compare_<group>.py's comparisons; print and (unless write=False) record them."""
    import importlib
    set_threads()
    module = importlib.import_module(f"bench.compare_{group}")
    info = machine_info()
    copy_gbps = device_copy_gbps() if getattr(module, "DEVICE", "cpu") == "cuda" else None
    if copy_gbps:
        info["copy_gbps"] = copy_gbps
        print(f"device-to-device copy: {copy_gbps:.0f} GB/s", flush=True)
    rows = []
    for c in module.comparisons(quick=quick):
        if only and only not in c.name:
            continue
        row = measure(c)
        if copy_gbps and row.get("ours_gbps"):
            row["of_copy"] = row["ours_gbps"] / copy_gbps
        rows.append(row)
        print(markdown_table([row]).splitlines()[-1], flush=True)
    if write and not quick:
        (BENCH_DIR / "results").mkdir(exist_ok=True)
        (BENCH_DIR / "results" / f"{result_name(group, info)}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
        write_results_md()
    return rows
