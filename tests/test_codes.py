"""The dtype, pooling, metric and qmatmul format codes have one definition, bindings/_codes.h: every
compiled kernel module was built with the values recscore.bindings._cpu exposes, and every backend,
CPU and Triton, passes those values."""
import pytest

from recscore.bindings import _cpu, _embedding_bag, _qmatmul, _topk_scan
from recscore.kernels._rows import ROW_DTYPES
from recscore.kernels.embedding_bag import POOLINGS
from recscore.kernels.embedding_bag import cpu as embedding_bag_cpu
from recscore.kernels.qmatmul import MATRIX_FORMATS
from recscore.kernels.qmatmul import cpu as qmatmul_cpu
from recscore.kernels.topk import METRICS
from recscore.kernels.topk import cpu as topk_cpu

ALL_CODES = [_cpu.DTYPE_CODES, _cpu.POOLING_CODES, _cpu.METRIC_CODES, _cpu.QMATMUL_FORMAT_IDS]


def test_every_name_the_api_takes_has_one_distinct_code():
    assert tuple(_cpu.DTYPE_CODES) == ROW_DTYPES
    assert tuple(_cpu.POOLING_CODES) == POOLINGS
    assert tuple(_cpu.METRIC_CODES) == METRICS
    assert set(_cpu.QMATMUL_FORMAT_IDS) == set(MATRIX_FORMATS) - {"f32"}   # f32 runs in NumPy
    for codes in ALL_CODES:
        assert sorted(codes.values()) == list(range(len(codes)))   # the kernels index tables by them


def test_every_compiled_module_was_built_with_the_one_definition():
    assert _embedding_bag.codes() == {"dtype": _cpu.DTYPE_CODES, "pooling": _cpu.POOLING_CODES}
    assert _topk_scan.codes() == {"dtype": _cpu.DTYPE_CODES, "metric": _cpu.METRIC_CODES}
    assert _qmatmul.codes() == _cpu.QMATMUL_FORMAT_IDS


def test_cpu_backends_pass_the_one_definition():
    assert embedding_bag_cpu.DTYPE_CODES is _cpu.DTYPE_CODES
    assert embedding_bag_cpu.POOLING_CODES is _cpu.POOLING_CODES
    assert topk_cpu.DTYPE_CODES is _cpu.DTYPE_CODES
    assert topk_cpu.METRIC_CODES is _cpu.METRIC_CODES
    assert qmatmul_cpu.FORMAT_IDS is _cpu.QMATMUL_FORMAT_IDS


def test_triton_backends_branch_on_the_one_definition():
    pytest.importorskip("triton")
    from recscore.kernels.embedding_bag import triton as embedding_bag_triton
    from recscore.kernels.qmatmul import triton as qmatmul_triton
    from recscore.kernels.topk import triton as topk_triton

    assert embedding_bag_triton.DTYPE_CODES is _cpu.DTYPE_CODES
    assert embedding_bag_triton.POOLING_CODES is _cpu.POOLING_CODES
    dtype_branches = {"fp32": embedding_bag_triton.FP32, "fp16": embedding_bag_triton.FP16,
                      "bf16": embedding_bag_triton.BF16, "int8": embedding_bag_triton.INT8,
                      "int4": embedding_bag_triton.INT4}
    dtype_bits = {"fp32": embedding_bag_triton.FP32_BIT, "fp16": embedding_bag_triton.FP16_BIT,
                  "bf16": embedding_bag_triton.BF16_BIT, "int8": embedding_bag_triton.INT8_BIT,
                  "int4": embedding_bag_triton.INT4_BIT}
    assert {name: code.value for name, code in dtype_branches.items()} == _cpu.DTYPE_CODES
    assert {name: bit.value for name, bit in dtype_bits.items()} == {name: 1 << code for name, code
                                                                     in _cpu.DTYPE_CODES.items()}
    assert embedding_bag_triton.MEAN.value == _cpu.POOLING_CODES["mean"]
    assert embedding_bag_triton.MAX.value == _cpu.POOLING_CODES["max"]

    assert topk_triton.METRIC_CODES is _cpu.METRIC_CODES
    assert {"ip": topk_triton.IP.value, "cosine": topk_triton.COSINE.value,
            "l2": topk_triton.L2.value} == _cpu.METRIC_CODES

    assert qmatmul_triton.QMATMUL_FORMAT_IDS is _cpu.QMATMUL_FORMAT_IDS
    assert set(qmatmul_triton.FORMATS) <= set(_cpu.QMATMUL_FORMAT_IDS)
    assert {"int8": qmatmul_triton.INT8.value, "int4": qmatmul_triton.INT4.value,
            "q8_0": qmatmul_triton.Q8_0.value} == {fmt: _cpu.QMATMUL_FORMAT_IDS[fmt] for fmt in ("int8", "int4", "q8_0")}


def test_topk_floor_key_is_the_key_of_minus_infinity_with_id_zero():
    """The top-k key of (score, id) is order(float bits) << 32 | ~id (low 32 bits): the floor every
    finite score's key is above, one constant for the C scan and the Triton kernels."""
    import struct
    bits = struct.unpack("<i", struct.pack("<f", float("-inf")))[0]
    order = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    assert _cpu.TOPK_FLOOR_KEY == (order << 32) | 0xFFFFFFFF
    pytest.importorskip("triton")
    from recscore.kernels.topk import triton as topk_triton
    assert topk_triton.FLOOR_KEY == _cpu.TOPK_FLOOR_KEY
