"""Models that run on recscore's kernels, one flat file each (e.g. `minilm`: all-MiniLM-L6-v2 text embeddings)."""
