"""OpenAI-compatible multi-model LLM serving on Ray Serve and vLLM."""
