"""The OpenAI- and Anthropic-compatible server (the `server` extra): app (routes, auth, limits,
SSE, the one answer tail), engine (the worker), request (chat body -> plan), responses and
anthropic (their bodies -> the chat plan, replies -> their shapes), reply (events -> bodies, the
Shape), blocks (a reply as content blocks), cache_dir (the prompt-cache folder)."""
