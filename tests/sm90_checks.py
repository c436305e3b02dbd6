"""The Triton kernels compiled for an H100 (sm_90) on a machine with no GPU.

Run in a fresh process (tests/test_triton_sm90.py does), without TRITON_INTERPRET: Triton's
own NVIDIA back end compiles each kernel to a cubin with its bundled ptxas, exactly as on a
GPU, through a CUDA driver stand-in that knows an H100's limits, reads each cubin's register
and stack use with Triton's cuobjdump, and records launches instead of running them. Nothing
here checks results (the interpreter tests and the GPU runs do); it checks what only a real
GPU compile shows: every configuration the launchers reach compiles for sm_90, and what they
pass to the compiled kernel.

    python tests/sm90_checks.py embedding     # compile every reached configuration; direct launches
    python tests/sm90_checks.py topk          # the same for top-k and quantized matmul
    python tests/sm90_checks.py qmatmul
    python tests/sm90_checks.py launch-key    # LaunchCache's key is finer than Triton's specialization
    python tests/sm90_checks.py host-time     # host time per lookup call, GPU launch stubbed
"""
import os
import re
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: this compiles for a real GPU"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.backends.nvidia.driver import ty_to_cpp  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
H100 = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}
H100_PROPERTIES = type("DeviceProperties", (), {"multi_processor_count": 132, "name": "H100 (stand-in)"})()
launches = []    # (kernel name, grid, args, num_warps) of every launch, in order
compiled = []    # one entry per kernel loaded: name, constexprs, num_warps, registers, stack bytes


def cubin_resources(cubin):
    """Registers, stack bytes, and the local-memory loads and stores inside loops (spill traffic a
    program pays on every iteration; a loop runs from a backward branch's target to the branch)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
    instructions = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    addresses = [int(address, 16) for address, _ in instructions]
    # Branches: BRA with any modifiers (BRA.U, BRA.DIV, ...) or JMP, predicated or not, to an address.
    loops = [(int(target, 16), address) for address, (_, instruction) in zip(addresses, instructions)
             for target in re.findall(r"\b(?:BRA|JMP)(?:\.\w+)*\b[^;]*?0x([0-9a-f]+)", instruction)
             if int(target, 16) < address]
    assert not any(re.search(r"\b(BRX|JMX)\b", instruction) for _, instruction in instructions), \
        "an indirect branch: its loops cannot be read off the SASS"
    in_loops = sum(1 for address, (_, instruction) in zip(addresses, instructions)
                   if re.search(r"\b(LDL|STL)\b", instruction) and any(start <= address <= end for start, end in loops))
    return (int(re.search(r"REG:(\d+)", text).group(1)), int(re.search(r"STACK:(\d+)", text).group(1)), in_loops,
            len(loops))


class Utils:
    def load_binary(self, name, cubin, shared, device):
        registers, stack, spills_in_loops, loops = cubin_resources(cubin)
        compiled[-1].update(registers=registers, stack=stack, spills_in_loops=spills_in_loops, loops=loops)
        return name, name, registers, stack, 1024   # module, function, n_regs, n_spills (stack), max threads

    def get_device_properties(self, device):
        return H100


class RecordingLauncher:
    def __init__(self, src, metadata):   # Triton makes the launcher, then loads the binary
        self.metadata = metadata
        names = src.fn.arg_names   # Triton keys constexprs by argument position
        constants = {names[key[0]] if isinstance(key, tuple) else key: value for key, value in src.constants.items()}
        compiled.append({"name": metadata.name, "constants": constants, "num_warps": metadata.num_warps})

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        launches.append((function, (grid_x, grid_y, grid_z), args, self.metadata.num_warps))


class CompileOnlyCudaDriver(DriverBase):
    """Triton's CUDA driver, less the GPU: the target is an H100, launches are recorded."""

    def __init__(self):
        self.utils = Utils()
        self.launcher_cls = RecordingLauncher

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        return ty_to_cpp(ty)

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_benchmarker(self):
        def run_once(fn, quantiles=None, **options):  # the autotuner compiles every config; all "take" 1 ms
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return run_once


driver.set_active(CompileOnlyCudaDriver())
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from recscore.kernels import QuantizedMatrix, TableBatch, quantize_matrix, quantize_rows  # noqa: E402
from recscore.kernels.qmatmul import reference as qmatmul_reference  # noqa: E402
from recscore.kernels.qmatmul import triton as qmatmul_triton  # noqa: E402
from recscore.kernels.topk import triton as topk_triton  # noqa: E402
from recscore.kernels._triton_launch import LaunchCache, _int_key  # noqa: E402
from recscore.kernels.embedding_bag import triton as embedding_triton  # noqa: E402


def as_launched(args):
    """Launch arguments compared by value; tensors by address and dtype."""
    return tuple((a.data_ptr(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)


def as_described(launch):
    """A launch with its tensors as dtype and shape (calls allocate their outputs afresh)."""
    function, grid, args, num_warps = launch
    return function, grid, num_warps, tuple((a.dtype, a.shape) if isinstance(a, torch.Tensor) else a for a in args)


class CountingTritonPath:
    """Stands in for a LaunchCache's kernel: counts the calls that go through Triton's own path."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


def check_calls(calls, caches):
    """Each call twice: the first launches through Triton (compiling), the second directly (no call
    through Triton's path); both must launch the same kernels with the same grids, options and
    arguments (tensors by dtype and shape: calls allocate their outputs afresh)."""
    counters = []
    for cache in caches:
        cache.kernel = CountingTritonPath(cache.kernel)
        counters.append(cache.kernel)
    for label, call in calls:
        before = len(launches)
        call()
        through_triton = launches[before:]
        triton_calls = sum(counter.calls for counter in counters)
        call()
        direct = launches[before + len(through_triton):]
        assert direct and sum(counter.calls for counter in counters) == triton_calls, f"{label}: not launched directly"
        # (an autotuner's first call also launches every configuration it times: compare the final launches)
        final = through_triton[len(through_triton) - len(direct):]
        assert [as_described(x) for x in direct] == [as_described(x) for x in final], (label, direct, final)
        print(f"{label}: {len(through_triton)} launches, the direct ones alike")
    for cache, counter in zip(caches, counters):
        cache.kernel = counter.kernel


def embedding_batches(rng):
    """Batches that reach every dtype branch, pooling, weights, D from 1 to 1000 and fused rows."""
    def table(rows, dim, dtype):
        return quantize_rows(rng.standard_normal((rows, dim)).astype(np.float32), dtype).to("cpu")
    yield "fp32 D=64", [table(1000, 64, "fp32")], {}
    yield "int8 D=64", [table(1000, 64, "int8")], {}
    fused = quantize_rows(rng.standard_normal((1000, 64)).astype(np.float32), "int8").fused()
    yield "int8 fused D=64", [fused.to("cpu")], {}
    mixed = [table(50, dim, dtype)
             for dim, dtype in ((3, "fp32"), (48, "fp16"), (1, "bf16"), (129, "int8"), (16, "int4"))]
    for pooling, weighted in (("sum", True), ("mean", False), ("max", False)):
        yield f"every dtype, D=1..129, {pooling}{' weighted' if weighted else ''}", mixed, \
            {"pooling": pooling, "weighted": weighted}
    yield "fp16 + int4 D=1000", [table(20, 1000, "fp16"), table(20, 1000, "int4")], {}


def embedding_call(batch, rng, bags, pooling="sum", weighted=False, index_dtype=torch.int64):
    lengths = rng.integers(0, 40, batch.num_tables * bags)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    indices = torch.cat([torch.from_numpy(rng.integers(-1, rows, 40 * bags)) for rows in batch.rows])
    indices = indices[:int(offsets[-1])].to(index_dtype).contiguous()
    weights = torch.rand(indices.shape[0]) if weighted else None
    return indices, offsets, bags, pooling, weights


def report_compiled(name, constants, local_memory_allowed=False):
    """Registers and stack (local memory: spills) of every configuration compiled so far; unless
    allowed, no configuration may touch local memory inside a loop (a value saved before the bag
    loop and restored after it costs a program two stores and two loads, once)."""
    kernels = [k for k in compiled if k["name"] == name]
    assert kernels, f"no {name} was compiled"
    print(f"{name}: {len(kernels)} kernels compiled for sm_90 ({', '.join(constants)}: warps, registers, stack)")
    for kernel in kernels:
        print("  " + " ".join(str(kernel["constants"].get(c)) for c in constants)
              + f": {kernel['num_warps']} warps, {kernel['registers']} registers, {kernel['stack']} bytes of stack, "
              f"{kernel['spills_in_loops']} local loads/stores in loops")
    spilled = [kernel for kernel in kernels if kernel["spills_in_loops"]]
    assert local_memory_allowed or not spilled, f"{name} spills registers on sm_90: {spilled}"


SSA_LINE = re.compile(r"^\s*(%[\w.]+) = ([\w.]+) (.*?) : (.*?)(?: loc\(.*)?$")
INT32_RESULT = re.compile(r"(?:^|x|->\s*)i32>?$")


def int32_products_of(ttir, row_lengths):
    """The lines of a kernel's Triton IR that multiply by one of the arguments `row_lengths` (a row
    length or stride) in int32: an offset that wraps past 2**31 elements (kernels/_triton_offsets.py)."""
    from_lengths = {f"%{name}" for name in row_lengths}   # SSA values that are a row length, splat or broadcast
    products = []
    for line in ttir.splitlines():
        match = SSA_LINE.match(line)
        if not match:
            continue
        name, op, operands, result_type = match.groups()
        used = set(re.findall(r"%[\w.]+", operands))
        if op in ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape") and used & from_lengths:
            from_lengths.add(name)
        elif op == "arith.muli" and used & from_lengths and INT32_RESULT.search(result_type.strip()):
            products.append(line.strip())
    return products


def check_offsets(cache, row_lengths):
    """No kernel compiled through `cache` forms an offset as an int32 product with a row length."""
    assert cache.compiled, "nothing was compiled"
    for compiled_kernel, _, _ in cache.compiled.values():
        products = int32_products_of(compiled_kernel.asm["ttir"], row_lengths)
        assert not products, f"{compiled_kernel.name}: int32 offsets that wrap past 2**31: {products}"
    print(f"{len(cache.compiled)} kernels: every product with {', '.join(row_lengths)} in int64")


def check_embedding():
    rng = np.random.default_rng(0)
    calls = []
    for name, tables, options in embedding_batches(rng):
        batch = TableBatch(tables)
        for index_dtype in (torch.int64, torch.int32):
            call = embedding_call(batch, rng, 37, options.get("pooling", "sum"), options.get("weighted", False),
                                  index_dtype)
            calls.append((f"{name}, {index_dtype}",
                          lambda batch=batch, call=call: embedding_triton.lookup(batch, *call)))
    check_calls(calls, [embedding_triton._launch_lookup])
    check_offsets(embedding_triton._launch_lookup, ("total_dim",))
    report_compiled("_lookup_kernel", ("DTYPE_FLAGS", "POOLING", "HAS_WEIGHTS", "BLOCK_L", "BLOCK_D"))
    # The bag loop must be found, or the spill check above could not fail.
    assert all(k["loops"] for k in compiled if k["name"] == "_lookup_kernel"), "no loop found in a lookup's SASS"

    # A direct launch passes the compiled kernel exactly what Triton's own launch passed.
    batch = TableBatch([quantize_rows(rng.standard_normal((500, 48)).astype(np.float32), "int8").to("cpu")])
    indices, offsets, bags, pooling, weights = embedding_call(batch, rng, 100, weighted=True)
    meta, base, total_dim, flags, max_dim, row_align, dim_multiple, _ = embedding_triton._prepare(batch)
    out, errors = torch.empty((bags, total_dim)), torch.zeros(3, dtype=torch.int32)
    args = (base, meta, indices, offsets, weights, out, errors, bags, total_dim, indices.shape[0], bags, max_dim,
            flags, 0, True, row_align, dim_multiple)
    grid = lambda config: (bags, triton.cdiv(max_dim, config["BLOCK_D"]))  # noqa: E731
    launch = LaunchCache(embedding_triton._lookup_kernel)
    launch.kernel = counter = CountingTritonPath(launch.kernel)
    launch(grid, *args)
    through_triton = launches[-1]
    launch(grid, *args)
    direct = launches[-1]
    assert len(launch.compiled) == 1 and counter.calls == 1 and direct is not through_triton
    assert direct[:2] == through_triton[:2] and as_launched(direct[2]) == as_launched(through_triton[2]), \
        (direct, through_triton)
    print("direct launch == Triton's launch:", direct[0], direct[1], len(direct[2]), "arguments")


def check_launch_key():
    """Arguments that LaunchCache keys alike, Triton's binder specializes alike (so a cached kernel fits):
    random argument lists, each against siblings drawn at random from the same key."""
    binder = embedding_triton._lookup_kernel.fn.create_binder()[-1]
    rng = np.random.default_rng(1)
    buffers = {dtype: torch.zeros(64, dtype=dtype) for dtype in (torch.uint8, torch.int64, torch.int32, torch.float32)}
    edges = [0, 1, 2, 15, 16, 17, 32, 48, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, 2**62, 2**63 - 16,
             2**63 - 1, 2**63, 2**63 + 16, 2**64 - 1, -1, -16, -17, -2**31, -2**31 - 1, -2**31 - 16, -2**63]
    pointer_dtypes = [torch.uint8, torch.int64, (torch.int64, torch.int32), torch.int64, torch.float32, torch.float32,
                      torch.int32]

    def random_int():
        if rng.random() < 0.5:
            return edges[rng.integers(len(edges))]
        return int(rng.integers(-2**40, 2**40)) * 16 ** int(rng.integers(2)) + int(rng.integers(-1, 2))

    def view(dtype, aligned=None):   # a view of `dtype` at a 16-byte-aligned address or not
        starts = [k for k in range(8) if aligned is None or (k * buffers[dtype].element_size() % 16 == 0) == aligned]
        return buffers[dtype][int(rng.choice(starts)):]

    def random_args():
        pointers = [view(d[rng.integers(2)] if isinstance(d, tuple) else d) for d in pointer_dtypes]
        sizes = [random_int() for _ in range(5)]   # bags, total_dim, n_indices, n_segments, MAX_DIM (tuning key)
        return pointers + sizes + [int(rng.choice([1, 8, 31])), int(rng.integers(3)), bool(rng.integers(2)), 16, 16]

    def sibling_of(args):   # other values with the same key: same dtypes, alignments, int classes, MAX_DIM
        pointers = [view(p.dtype, p.data_ptr() % 16 == 0) for p in args[:7]]
        sizes = []
        for value in args[7:11]:
            while _int_key(other := random_int()) != _int_key(value):
                pass
            sizes.append(other)
        return pointers + sizes + args[11:]

    launch = LaunchCache(embedding_triton._lookup_kernel)
    config = {"BLOCK_L": 8, "BLOCK_D": 64, "num_warps": 1}
    for trial in range(2000):
        args = random_args()
        _, specialization, _ = binder(*args, **config)
        for _ in range(5):
            sibling = sibling_of(args)
            assert launch.key(sibling, {}) == launch.key(args, {})
            _, sibling_specialization, _ = binder(*sibling, **config)
            assert list(map(tuple, sibling_specialization)) == list(map(tuple, specialization)), (args, sibling)
    print("10000 argument lists keyed like another had its Triton specialization")


def check_topk():
    rng = np.random.default_rng(3)
    torch.cuda.get_device_properties = lambda device: H100_PROPERTIES   # the launcher sizes its grid by SMs

    def call(B, N, D, k, metric, dtype, exclude):
        queries = torch.randn(B, D)
        corpus = quantize_rows(rng.standard_normal((N, D)).astype(np.float32), dtype).to("cpu")
        excluded = None
        if exclude:
            indptr = np.arange(0, 2 * B + 1, 2, dtype=np.int64)
            excluded = (indptr, rng.integers(0, N, 2 * B).astype(np.int64))
        return lambda: topk_triton.topk(queries, corpus, k, metric, excluded)

    calls = [(f"B={B} N={N} D={D} k={k} {metric} {dtype}{' exclude' if exclude else ''}",
              call(B, N, D, k, metric, dtype, exclude))
             for B, N, D, k, metric, dtype, exclude in [
                 (1, 1000, 64, 10, "ip", "fp32", False), (1, 1000, 3, 100, "cosine", "fp16", True),
                 (16, 1000, 64, 10, "l2", "int8", True), (16, 777, 1000, 100, "ip", "fp32", False),
                 (16, 1000, 48, topk_triton.MAX_K, "cosine", "int8", False)]]
    check_calls(calls, [topk_triton._launch_partial_topk])
    check_offsets(topk_triton._launch_partial_topk, ("D", "words_per_query"))
    # A query's best K_PAD keys live in registers: large k spills (topk_triton.MAX_K says how far it goes).
    report_compiled("_partial_topk_kernel", ("METRIC", "QUANTIZED", "HAS_EXCLUDE", "BLOCK_Q", "BLOCK_N", "BLOCK_D",
                                             "K_PAD"), local_memory_allowed=True)


def check_qmatmul():
    rng = np.random.default_rng(4)
    qmatmul_triton._sm_count = lambda device: H100_PROPERTIES.multi_processor_count   # split K as on an H100

    def matrix(fmt, rows, in_features):
        if fmt in ("int8", "int4"):
            return quantize_matrix(rng.standard_normal((rows, in_features)).astype(np.float32), fmt, group_size=32)
        weights_per_block, block_bytes = qmatmul_reference.GGUF_BLOCKS[fmt]
        blocks = rng.integers(0, 256, (rows * in_features // weights_per_block, block_bytes), dtype=np.uint8)
        blocks[:, :2] = np.float16(0.01).reshape(1, 1).view(np.uint8)   # finite fp16 scales
        return QuantizedMatrix(fmt, (rows, in_features), blocks.reshape(rows, -1), None, weights_per_block)

    calls = []
    for fmt in qmatmul_triton.FORMATS:
        qm = matrix(fmt, 300, 512)
        for M in (1, 16, 64):
            x = torch.randn(M, 512)
            calls.append((f"{fmt} M={M}", lambda x=x, qm=qm: qmatmul_triton.matmul(x, qm)))
    caches = [qmatmul_triton._launch_qgemv, qmatmul_triton._launch_qgemv_int4, qmatmul_triton._launch_qgemv_q4_k,
              qmatmul_triton._launch_qgemm]
    check_calls(calls, caches)
    for cache in caches:
        check_offsets(cache, ("N", "K", "row_bytes", "n_groups"))
    for name in ("qgemv_kernel", "qgemv_int4_kernel", "qgemv_q4_k_kernel"):
        report_compiled(name, ("FMT", "BLOCK_N", "BLOCK_K", "BLOCK_B", "SPLIT_K"))
    # The GEMM decodes int4 and Q4_K weights element by element: those tiles spill (bench/notes/results-2026-11.md).
    report_compiled("qgemm_kernel", ("FMT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"), local_memory_allowed=True)


def time_host():
    """Host time per lookup call (fp32, D = 64, B = 2048) through Triton's launch path and the direct one,
    with the GPU launch itself a no-op: what each costs the calling thread before any CUDA work."""
    RecordingLauncher.__call__ = lambda self, *args: None
    rng = np.random.default_rng(2)
    batch = TableBatch([quantize_rows(rng.standard_normal((1000, 64)).astype(np.float32), "fp32").to("cpu")])
    call = embedding_call(batch, rng, 2048)
    embedding_triton.lookup(batch, *call)
    for fast in (False, True) * 3:
        embedding_triton._launch_lookup.fast = fast
        times = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(2000):
                embedding_triton.lookup(batch, *call)
            times.append((time.perf_counter() - start) / 2000 * 1e6)
        print(f"{'direct' if fast else 'triton'} launch: {np.median(times):.1f} us per lookup "
              f"(min {min(times):.1f}, max {max(times):.1f}; 7 runs of 2000 calls)")


if __name__ == "__main__":
    {"embedding": check_embedding, "topk": check_topk, "qmatmul": check_qmatmul, "launch-key": check_launch_key,
     "host-time": time_host}[sys.argv[1]]()
