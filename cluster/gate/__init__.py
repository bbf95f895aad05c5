"""The gate: API keys, rate limits (the Redis Lua scripts and the in-memory fallback), abuse
monitoring and spend. Knows no HTTP; refusals are ``cluster.errors`` exceptions."""
