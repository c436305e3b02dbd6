"""Cold start of every CPU kernel: the first call in a new process, as a restarted host service feels it.

    python -m bench.cold_start            # at the detected level; RECSCORE_CPU=<level> for another

Each case runs in two fresh interpreters sharing one empty NUMBA_CACHE_DIR: "cold" (nothing cached:
every Numba kernel it touches compiles) and then "warm" (the cache the first one wrote). Each reports
the import of recscore.kernels and its first and second call; the budget (issue 15) is on the first
call: 2 s cold, 0.5 s warm. Inputs are made before the clock starts. Writes
bench/results/cold_start-<level>.json and rewrites RESULTS.md.
"""
import json
import os
import subprocess
import sys
import tempfile

from bench import report
from bench.protocol import machine_info

COLD_BUDGET_S, WARM_BUDGET_S = 2.0, 0.5

SETUP = """
import time
import json
start = time.perf_counter()
import numpy as np
import recscore.kernels as K
imported = time.perf_counter() - start
rng = np.random.default_rng(0)
table = rng.standard_normal((100_000, 64)).astype(np.float32)
indices = rng.integers(0, 100_000, 4096 * 8).astype(np.int64)
offsets = np.arange(0, 4096 * 8 + 1, 8, dtype=np.int64)
queries = rng.standard_normal((16, 64)).astype(np.float32)
exclude = (np.arange(0, 49, 3, dtype=np.int64), np.tile(np.array([1, 2, 3], np.int64), 16))   # CSR: 3 a query
weight = rng.standard_normal((1024, 512)).astype(np.float32)
x1, x16 = queries[:1, :].repeat(8, axis=1), queries.repeat(8, axis=1)
"""

# (name, setup outside the clock, the call)
CASES = [
    ("embedding_bag fp32 sum", "t = K.RowTable('fp32', table.shape, table)", "K.embedding_bag(t, indices, offsets)"),
    ("embedding_bag int8 mean", "t = K.quantize_rows(table, 'int8')",
     "K.embedding_bag(t, indices, offsets, pooling='mean')"),
    ("quantize_rows int8", "", "K.quantize_rows(table, 'int8')"),
    ("quantize_rows int4", "", "K.quantize_rows(table, 'int4')"),
    ("quantize_rows fp16", "", "K.quantize_rows(table, 'fp16')"),
    ("quantize_rows bf16", "", "K.quantize_rows(table, 'bf16')"),
    ("topk fp32 ip, exclusions", "t = K.RowTable('fp32', table.shape, table)", "K.topk(queries, t, 100, exclude=exclude)"),
    ("topk int8 cosine", "t = K.quantize_rows(table, 'int8')", "K.topk(queries, t, 10, metric='cosine')"),
    ("quantize_matrix int8", "", "K.quantize_matrix(weight, 'int8', group_size=32)"),
    ("qmatmul int8 M=1 (row kernel)", "m = K.quantize_matrix(weight, 'int8', group_size=32)", "K.qmatmul(x1, m)"),
    ("qmatmul int4 M=16 (panels, built on this call)", "m = K.quantize_matrix(weight, 'int4', group_size=32)",
     "K.qmatmul(x16, m)"),
    ("qmatmul int8 group 16 (float activations)", "m = K.quantize_matrix(weight, 'int8', group_size=16)",
     "K.qmatmul(x16, m)"),
    ("QuantizedMatrix.take int4", "m = K.quantize_matrix(weight, 'int4', group_size=32)", "m.take(indices[:512] % 1024)"),
]

TIMED = """
{setup}
first = time.perf_counter()
{call}
second = time.perf_counter()
{call}
done = time.perf_counter()
print(json.dumps({{"import_s": imported, "first_s": second - first, "second_s": done - second}}))
"""


def run_case(setup, call, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    source = SETUP + TIMED.format(setup=setup, call=call)
    result = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    rows = []
    for name, setup, call in CASES:
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = run_case(setup, call, cache_dir)
            warm = run_case(setup, call, cache_dir)
        row = {"name": name, "import_cold_s": cold["import_s"], "first_cold_s": cold["first_s"],
               "import_warm_s": warm["import_s"], "first_warm_s": warm["first_s"], "steady_s": warm["second_s"],
               "met": cold["first_s"] <= COLD_BUDGET_S and warm["first_s"] <= WARM_BUDGET_S}
        print(f"{name}: import {cold['import_s']:.2f}/{warm['import_s']:.2f} s, first call {cold['first_s']:.3f}/"
              f"{warm['first_s']:.3f} s (cold/warm), then {warm['second_s'] * 1e3:.2f} ms", flush=True)
        rows.append(row)
    machine = machine_info()
    path = report.RESULTS_DIR / f"cold_start-{machine['cpu_level']}.json"
    path.write_text(json.dumps({"machine": machine, "budget_s": {"cold": COLD_BUDGET_S, "warm": WARM_BUDGET_S},
                                "rows": rows}, indent=1))
    report.write()


if __name__ == "__main__":
    main()
