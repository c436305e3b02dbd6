"""The C conversions of quantize_rows (recscore.bindings._quantize_rows): bit for bit the reference on odd
shapes, constant rows and extreme values at every CPU level, and every bad argument refused before any C
runs."""
import numpy as np
import pytest

from recscore.bindings import _quantize_rows
from recscore.kernels._cpu import LEVELS
from recscore.kernels._cpu import cpu_level as current_level
from recscore.kernels.quantize_rows import cpu, reference

DIMS = [1, 3, 7, 33, 64, 129]
ROWS = [1, 5, 1000]


def assert_bits_equal(got, want):
    """Equal bit patterns, so -0.0 against 0.0 (or a different NaN) fails too."""
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def extreme_rows(rng, rows, dim):
    """Normal rows of very different magnitudes, plus constant rows (scale 0), rows spanning +-1e30,
    subnormal rows and rows mixing subnormals with zeros and ordinary values."""
    weights = rng.standard_normal((rows, dim)) * 10.0 ** rng.integers(-30, 30, (rows, 1))
    specials = [np.full(dim, 0.25), np.zeros(dim), np.full(dim, -1e30),
                rng.choice([-1e30, 1e30, 0.0, 1.0], dim),
                rng.uniform(-1, 1, dim) * 1e-40,                                    # float32 subnormals
                rng.choice([1e-45, -1e-45, 0.0, 3e-39, 1.0], dim)]
    for r, row in zip(range(rows), specials):
        weights[r] = row
    return weights


@pytest.mark.parametrize("weight_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16", "bf16"])
def test_c_matches_reference_bit_for_bit(rng, cpu_level, dtype, dim, rows, weight_dtype):
    weights = extreme_rows(rng, rows, dim)
    if dtype == "fp16":   # quantize_rows refuses values beyond fp16's range before any kernel runs
        weights = np.clip(weights, -65504, 65504)
    weights = weights.astype(weight_dtype)
    before = weights.copy()
    assert_bits_equal(cpu.quantize(weights, dtype), reference.quantize(weights, dtype))
    assert np.array_equal(weights, before)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("weight_dtype", [np.float32, np.float64])
def test_quantize_codes_on_several_threads(rng, cpu_level, bits, weight_dtype):
    """Threads split the rows; each row's result is the same on any number of them."""
    weights = extreme_rows(rng, 1001, 33).astype(weight_dtype)
    dtype = "int8" if bits == 8 else "int4"
    want = reference.quantize(weights, dtype)
    for threads in (1, 2, 3, 7):
        codes = np.empty(want[0].shape, np.uint8)
        scale, bias = np.empty(1001, np.float32), np.empty(1001, np.float32)
        _quantize_rows.quantize_codes(weights, bits, codes, scale, bias, threads, LEVELS.index(cpu_level))
        assert_bits_equal((codes, scale, bias), want)


@pytest.mark.parametrize("convert,dtype", [(_quantize_rows.to_half_bits, "fp16"), (_quantize_rows.to_bf16_bits, "bf16")])
def test_narrowing_on_several_threads(rng, cpu_level, convert, dtype):
    weights = rng.standard_normal((1001, 7)).astype(np.float32)
    want = reference.quantize(weights, dtype)[0].view(np.uint16)
    for threads in (1, 2, 3, 7):
        out = np.empty((1001, 7), np.uint16)
        convert(weights, out, threads, LEVELS.index(cpu_level))
        assert np.array_equal(out, want)


def test_half_bits_of_nan_and_infinity_as_numpy():
    """The binding itself takes any float32 (quantize_rows refuses non-finite values before it)."""
    bits = np.array([[0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0x7FA00000, 0xFF802000, 0x477FF000,
                      0x477FEFFF, 0x33000000, 0x33000001]], np.uint32)
    out = np.empty(bits.shape, np.uint16)
    _quantize_rows.to_half_bits(bits.view(np.float32), out, 1, current_level())
    with np.errstate(over="ignore"):
        assert np.array_equal(out, bits.view(np.float32).astype(np.float16).view(np.uint16))


def quantize_arguments(rows=4, dim=5, bits=8):
    return dict(weights=np.zeros((rows, dim), np.float32), bits=bits,
                codes=np.zeros((rows, dim if bits == 8 else (dim + 1) // 2), np.uint8),
                scale=np.full(rows, 7.0, np.float32), bias=np.full(rows, 7.0, np.float32), num_threads=1,
                level=current_level())


def replaced(arguments, **changes):
    return {**arguments, **changes}


BAD_QUANTIZE = [
    (dict(weights=np.zeros((4, 5), np.float16)), TypeError, "weights must be float32 or float64"),
    (dict(weights=np.zeros((4, 5), np.int32)), TypeError, "weights must be float32 or float64"),
    (dict(weights=[[0.0] * 5] * 4), TypeError, "weights must be a NumPy array"),
    (dict(weights=np.zeros(20, np.float32)), ValueError, "weights must be 2-D"),
    (dict(weights=np.zeros((5, 4), np.float32)), ValueError, "codes must have shape"),
    (dict(weights=np.zeros((4, 10), np.float32)[:, ::2]), ValueError, "weights must be C-contiguous"),
    (dict(codes=np.zeros((4, 5), np.int8)), TypeError, "codes must be uint8"),
    (dict(codes=np.zeros((4, 6), np.uint8)), ValueError, r"codes must have shape \(4, 5\)"),
    (dict(codes=np.zeros((4, 3), np.uint8)), ValueError, r"codes must have shape \(4, 5\)"),
    (dict(codes=np.zeros((5, 4), np.uint8).T), ValueError, "codes must be C-contiguous"),
    (dict(scale=np.zeros(4, np.float64)), TypeError, "scale must be float32"),
    (dict(scale=np.zeros(3, np.float32)), ValueError, r"scale must have shape \(4,\)"),
    (dict(bias=np.zeros((4, 1), np.float32)), ValueError, r"bias must have shape \(4,\)"),
    (dict(bias=np.zeros(4, np.float16)), TypeError, "bias must be float32"),
    (dict(bits=2), ValueError, "bits must be 8 or 4"),
    (dict(num_threads=0), ValueError, "num_threads must be at least 1"),
]


@pytest.mark.parametrize("changes,error,message", BAD_QUANTIZE)
def test_quantize_codes_refuses_bad_arguments_before_running(changes, error, message):
    arguments = replaced(quantize_arguments(), **changes)
    with pytest.raises(error, match=message):
        _quantize_rows.quantize_codes(**arguments)
    for name in ("scale", "bias"):   # nothing written: the C never ran
        if name not in changes:
            assert np.all(arguments[name] == 7.0)


def test_quantize_codes_checks_the_int4_row_bytes():
    arguments = quantize_arguments(bits=4)
    _quantize_rows.quantize_codes(**arguments)
    with pytest.raises(ValueError, match=r"codes must have shape \(4, 3\)"):
        _quantize_rows.quantize_codes(**replaced(arguments, codes=np.zeros((4, 5), np.uint8)))


def test_outputs_must_be_writeable():
    arguments = quantize_arguments()
    arguments["codes"].flags.writeable = False
    with pytest.raises(ValueError, match="codes must be writeable"):
        _quantize_rows.quantize_codes(**arguments)
    out = np.zeros((4, 5), np.uint16)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        _quantize_rows.to_half_bits(np.zeros((4, 5), np.float32), out, 1, current_level())


@pytest.mark.parametrize("convert", [_quantize_rows.to_half_bits, _quantize_rows.to_bf16_bits])
@pytest.mark.parametrize("weights,out,error,message", [
    (np.zeros((4, 5), np.float64), np.zeros((4, 5), np.uint16), TypeError, "weights must be float32"),
    (np.zeros(5, np.float32), np.zeros(5, np.uint16), ValueError, "weights must be 2-D"),
    (np.zeros((4, 5), np.float32), np.zeros((4, 5), np.float16), TypeError, "out must be uint16"),
    (np.zeros((4, 5), np.float32), np.zeros((4, 4), np.uint16), ValueError, r"out must have shape \(4, 5\)"),
    (np.zeros((4, 5), np.float32), np.zeros((5, 4), np.uint16).T, ValueError, "out must be C-contiguous"),
    (np.zeros((4, 5), np.float32), None, TypeError, "out must be a NumPy array"),
])
def test_narrowing_refuses_bad_arguments_before_running(convert, weights, out, error, message):
    before = None if out is None else out.copy()
    with pytest.raises(error, match=message):
        convert(weights, out, 1, current_level())
    if out is not None:
        assert np.array_equal(out, before)
    with pytest.raises(ValueError, match="num_threads must be at least 1"):
        convert(np.zeros((4, 5), np.float32), np.zeros((4, 5), np.uint16), 0, current_level())


def test_empty_tables():
    for rows, dim in [(0, 5), (3, 0), (0, 0)]:
        weights = np.zeros((rows, dim), np.float32)
        for dtype in ("int8", "int4", "fp16", "bf16"):
            assert_bits_equal(cpu.quantize(weights, dtype), reference.quantize(weights, dtype))


def test_levels_this_cpu_lacks_are_refused():
    """Every entry refuses a level outside 0 .. the CPU's (no instruction the CPU lacks can run)."""
    weights, out = np.zeros((4, 5), np.float32), np.zeros((4, 5), np.uint16)
    for level in (-1, len(LEVELS)):
        with pytest.raises(ValueError, match="not one this CPU runs"):
            _quantize_rows.quantize_codes(**replaced(quantize_arguments(), level=level))
        for convert in (_quantize_rows.to_half_bits, _quantize_rows.to_bf16_bits):
            with pytest.raises(ValueError, match="not one this CPU runs"):
                convert(weights, out, 1, level)
