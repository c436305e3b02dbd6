"""recscore.kernels: the public kernel API (see API.md in the project's shared docs).

The backend follows the data: NumPy arrays and CPU tensors run the CPU kernels
(Numba/Cython), CUDA tensors run the Triton kernels; `use_backend` forces one.
"""
from ._backend import BACKENDS, aligned_empty, use_backend
from .embedding_bag import TableBatch, embedding_bag
from .qmatmul import QuantizedMatrix, qmatmul, quantize_matrix
from .quantize_rows import RowTable, quantize_rows
from .topk import ItemIndex, topk

__all__ = [
    "BACKENDS",
    "ItemIndex",
    "QuantizedMatrix",
    "RowTable",
    "TableBatch",
    "aligned_empty",
    "embedding_bag",
    "qmatmul",
    "quantize_matrix",
    "quantize_rows",
    "topk",
    "use_backend",
]
