"""The Cython bindings check every size and code their C code indexes by, whatever the caller passes:
each call below would have read or written out of bounds (or indexed a table by a bad code) before."""
import numpy as np
import pytest

from recscore.bindings import _checks, _embedding_bag
from recscore.kernels import TableBatch, quantize_rows
from recscore.kernels.embedding_bag import cpu

BASELINE = 0   # every CPU runs it


def embedding_bag_args(rng):
    """A valid call of _embedding_bag.lookup over two tables (D 8 and 4), two bags each, as a dict."""
    tables = [quantize_rows(rng.standard_normal((10, dim)).astype(np.float32), "fp32") for dim in (8, 4)]
    _, description, total_dim = cpu._prepare(TableBatch(tables))
    return dict(tables=description.copy(), indices=np.array([1, 2, 3, 4, 5], np.int64),
                offsets=np.array([0, 1, 3, 4, 5], np.int64), weights=None, bags_per_table=2, pooling=0, check=True,
                out=np.empty((2, total_dim), np.float32), num_threads=1, level=BASELINE), tables


def lookup(args):
    return _embedding_bag.lookup(args["tables"], args["indices"], args["offsets"], args["weights"],
                                 args["bags_per_table"], args["pooling"], args["check"], args["out"],
                                 args["num_threads"], args["level"])


def table_column(name):
    return cpu.DESCRIPTION_COLUMNS.index(name)


def narrow_out(args):
    args["out"] = np.empty((2, args["out"].shape[1] - 1), np.float32)


def set_description(table, name, value):
    def change(args):
        args["tables"][table, table_column(name)] = value
    return change


def set_argument(name, value):
    def change(args):
        args[name] = value
    return change


@pytest.mark.parametrize("change, message", [
    (narrow_out, r"out has 11 columns, but tables\[1\] writes columns 8..11"),
    (set_description(1, "column", 9), r"tables\[1\] writes columns 9..12"),
    (set_description(0, "column", -1), r"tables\[0\] writes columns -1..6"),
    (set_description(0, "dim", 13), r"tables\[0\] writes columns 0..12"),
    (set_description(0, "dim", -1), r"tables\[0\] has a negative row count or D"),
    (set_description(1, "rows", -5), r"tables\[1\] has a negative row count or D"),
    (set_description(1, "dtype", 5), r"tables\[1\] has dtype code 5, not one of 0..4"),
    (set_description(0, "dtype", -1), r"tables\[0\] has dtype code -1"),
    (set_argument("pooling", 3), r"pooling code 3 is not one of 0..2"),
    (set_argument("pooling", -1), r"pooling code -1"),
    (set_argument("offsets", np.array([0, 3, 1, 4, 5], np.int64)), "offsets must start at 0, not decrease"),
    (set_argument("offsets", np.array([-2, 1, 3, 4, 5], np.int64)), "offsets must start at 0"),
    (set_argument("offsets", np.array([0, 1, 3, 4, 4], np.int64)), r"end at len\(indices\) = 5"),
    (set_argument("offsets", np.array([0, 1, 3, 5], np.int64)), "offsets must have tables . bags_per_table . 1 = 5"),
    (set_argument("bags_per_table", -1), "offsets must have"),
    (set_argument("weights", np.ones(4, np.float32)), r"weights must have one value per index \(5\), got 4"),
    (set_argument("out", np.empty((3, 12), np.float32)), "out must have bags_per_table = 2 rows, got 3"),
    (set_argument("num_threads", 0), "num_threads must be at least 1"),
    (set_argument("tables", np.zeros((2, 7), np.int64)), "tables must have 8 columns, got 7"),
])
def test_embedding_bag_lookup_refuses_what_the_c_code_would_read_past(rng, change, message):
    args, tables = embedding_bag_args(rng)
    assert lookup(args) == -1   # the unchanged call is valid
    change(args)
    with pytest.raises(ValueError, match=message):
        lookup(args)
    del tables   # the description holds their addresses: they live until here


def test_first_bad_index_checks_the_offsets_it_reads_by():
    indices, rows = np.array([0, 1, 2, 3], np.int64), np.array([4, 4], np.int64)
    assert _checks.first_bad_index(indices, np.array([0, 1, 2, 3, 4], np.int64), rows, 2) == -1
    for offsets, message in [(np.array([0, 1, 9, 3, 4], np.int64), r"offsets\[2\] breaks"),
                             (np.array([0, 3, 1, 3, 4], np.int64), r"offsets\[2\] breaks"),
                             (np.array([5, 5, 5, 5, 5], np.int64), r"offsets\[0\] breaks"),
                             (np.array([0, 1, 2, 3, 3], np.int64), r"offsets\[4\] breaks"),
                             (np.array([0, 1, 4], np.int64), "offsets must have len.rows_per_table. . bags_per_table . 1 = 5")]:
        with pytest.raises(ValueError, match=message):
            _checks.first_bad_index(indices, offsets, rows, 2)
    with pytest.raises(ValueError, match="offsets must have"):
        _checks.first_bad_index(indices, np.array([0], np.int64), rows, -1)
