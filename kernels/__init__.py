"""recscore.kernels: the public kernel API (see API.md in the project's shared docs).

The backend follows the data: NumPy arrays and CPU tensors run the CPU kernels
(C via Cython), CUDA tensors run the Triton kernels; `use_backend` forces one.
"""
from ._backend import BACKENDS, aligned_empty, use_backend
from ._cpu import cpu_info, use_cpu_level
from .embedding_bag import TableBatch, embedding_bag
from .qmatmul import QuantizedMatrix, qmatmul, quantize_matrix
from ._rows import RowTable
from .quantize_rows import quantize_rows
from .topk import ItemIndex, topk

__all__ = [
    "BACKENDS",
    "ItemIndex",
    "QuantizedMatrix",
    "RowTable",
    "TableBatch",
    "aligned_empty",
    "cpu_info",
    "embedding_bag",
    "qmatmul",
    "quantize_matrix",
    "quantize_rows",
    "topk",
    "use_backend",
    "use_cpu_level",
]
