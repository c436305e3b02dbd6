"""CPU quantized matmul and row decoding: the C kernels of bindings/_qmatmul_simd.h at the calling
thread's vector level (kernels/_cpu.py), compiled ahead of time for every level.

matmul: q8_0, q5_0, q4_k, q6_k, int8 and int4 (groups of 32 or a multiple of 64) take the
int8-activation path (`int8_activations`): x quantized to int8 per block of `activation_block(qm)`
values (32 for the GGUF formats as llama.cpp does, the weight group for int8 and int4), exact integer
dot products, float32 scaling once per block. M = 1 reads the packed rows (the row kernel);
M >= PANEL_MIN_M reads panels of 8 or 16 rows (the level's lanes) repacked once per matrix and level
and kept in qm.prepared; matrices above PANEL_MAX_WEIGHTS (the 262144-row output projection) keep only
their packed rows: M >= STREAMED_PANEL_MIN_M repacks a few panels at a time on the fly (the streamed
panel kernel), smaller M takes the row kernel, which decodes each tile of rows once per call. Error: |y - x @ W.T| <= (1.01 / 254 +
2e-5) * (xmax @ |Wq|.T), see tests/test_qmatmul.py. f16 and other group sizes: float32 activations
(error ~1e-6 relative). f32: NumPy.
take/dequantize: equal to reference.py (and gguf) bit for bit.
Measurements and decisions: bench/notes/cpu-qmatmul.md.
"""
import numpy as np

from .._cpu import cpu_level, kernel_threads
from ...bindings import _qmatmul
from ...bindings._cpu import QMATMUL_FORMAT_IDS as FORMAT_IDS

INT8_ACTIVATION_FORMATS = ("q8_0", "q5_0", "q4_k", "q6_k", "int8", "int4")
PANEL_MIN_M = 2                 # M from which the repacked panels run
PANEL_MAX_WEIGHTS = 1 << 24     # larger matrices keep only their packed bytes (panels: 1.375 bytes a weight)
STREAMED_PANEL_MIN_M = 16       # from here on-the-fly panels beat the row kernel on such matrices
SINGLE_THREAD_MACS = 1 << 22    # below: one thread (waking the second one costs more than it saves)

_NO_SCALES = np.zeros((0, 0), dtype=np.float32)
_NO_SCALES.flags.writeable = False


def _matrix(qm):
    """(format id, uint8 rows, scales, group size): the matrix arguments of every kernel."""
    return FORMAT_IDS[qm.fmt], qm.data.view(np.uint8), _NO_SCALES if qm.scales is None else qm.scales, qm.group_size


def int8_activations(qm):
    """Whether matmul quantizes x to int8 for qm (else float32 activations)."""
    if qm.fmt not in INT8_ACTIVATION_FORMATS or qm.shape[1] % 32:
        return False
    if qm.fmt == "int4":
        return qm.group_size == 32 or qm.group_size % 64 == 0
    return qm.group_size % 32 == 0


def activation_block(qm):
    """The values of x that share one int8 scale on the int8-activation path: the int8/int4 weight group
    (one int32 sum and one scaling per group; 32 past 65,536), else 32."""
    return _qmatmul.activation_block(FORMAT_IDS[qm.fmt], qm.group_size)


def uses_panels(qm, M):
    """Whether matmul runs the repacked-panel kernel for M rows of x."""
    return M >= PANEL_MIN_M and qm.shape[0] * qm.shape[1] <= PANEL_MAX_WEIGHTS and int8_activations(qm)


def panels(qm, level):
    """qm's weights in the panel layout of `level`, built on first use under qm.lock and kept in
    qm.prepared (64-byte aligned, read-only)."""
    key = ("panels", level)
    built = qm.prepared.get(key)
    if built is not None:
        return built
    with qm.lock:
        built = qm.prepared.get(key)
        if built is None:
            size = _qmatmul.panel_bytes(qm.shape[0], qm.shape[1], level)
            buffer = np.zeros(size + 64, dtype=np.uint8)
            start = -buffer.ctypes.data % 64
            built = buffer[start:start + size]
            _qmatmul.repack(*_matrix(qm), qm.shape[1], built, kernel_threads(), level)
            built.flags.writeable = False
            qm.prepared[key] = built
    return built


def threads(qm, M):
    """One thread below SINGLE_THREAD_MACS multiply-adds, else kernel_threads()."""
    return 1 if M * qm.shape[0] * qm.shape[1] < SINGLE_THREAD_MACS else kernel_threads()


def matmul(x, qm):
    if qm.fmt == "f32":
        return np.matmul(x, qm.data.view(np.float32).T)
    M = x.shape[0]
    out = np.empty((M, qm.shape[0]), dtype=np.float32)
    if out.size == 0:
        return out
    if qm.shape[1] == 0:
        out.fill(0.0)
        return out
    level, n_threads = cpu_level(), threads(qm, M)
    if uses_panels(qm, M):
        _qmatmul.panel_matmul(FORMAT_IDS[qm.fmt], panels(qm, level), qm.group_size, x, out, n_threads, level)
    elif int8_activations(qm) and M >= STREAMED_PANEL_MIN_M:
        _qmatmul.streamed_panel_matmul(*_matrix(qm), x, out, n_threads, level)
    elif int8_activations(qm):
        _qmatmul.matmul(*_matrix(qm), x, out, n_threads, level)
    else:
        _qmatmul.float_matmul(*_matrix(qm), x, out, n_threads, level)
    return out


def take(qm, rows):
    """rows: int64 NumPy (validated), or None for every row."""
    if qm.fmt == "f32":
        weight = qm.data.view(np.float32)
        return weight.copy() if rows is None else weight[rows]
    if rows is None:
        rows = np.arange(qm.shape[0], dtype=np.int64)
    out = np.empty((rows.shape[0], qm.shape[1]), dtype=np.float32)
    if out.size:
        n_threads = 1 if out.size < SINGLE_THREAD_MACS // 16 else kernel_threads()
        _qmatmul.take(*_matrix(qm), rows, out, n_threads, cpu_level())
    return out
