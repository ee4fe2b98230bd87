"""The OpenAI-compatible server (the `server` extra): app (routes, auth, limits, SSE), engine (the
worker), request (body -> plan), reply (events -> bodies), cache_dir (the prompt-cache folder)."""
