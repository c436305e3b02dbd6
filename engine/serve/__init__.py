"""`recscore serve`: the engine over HTTP (Starlette on uvicorn), API keys, limits, a small client."""
