"""The HTTP API: the OpenAI protocol, routes, SSE, the admin API and the Serve ingress. The
only package that imports FastAPI or Starlette; errors become HTTP here, in one table."""
