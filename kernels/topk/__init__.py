"""Exact similarity top-k over an item corpus (`topk`) and a live catalogue index (`ItemIndex`)."""
from .index import ItemIndex
from .search import METRICS, check_k, topk

__all__ = ["ItemIndex", "METRICS", "check_k", "topk"]
