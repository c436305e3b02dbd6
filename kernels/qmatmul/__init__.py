# Transitional: replaced by the quantized-matmul work (issue 5) in this session.
class QuantizedMatrix:
    pass


def quantize_matrix(weight, fmt, *, group_size=32):
    raise NotImplementedError


def qmatmul(x, qm):
    raise NotImplementedError
