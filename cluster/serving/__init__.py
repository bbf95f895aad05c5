"""Serving: the chat service (admit, route, price, stream, settle), the model replicas and
their vLLM engine, and the typed messages between them. Knows no HTTP."""
