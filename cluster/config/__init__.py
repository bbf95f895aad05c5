"""Configuration, declared once: process settings and the model catalog (``deployments/``),
and the Ray Serve options derived from them."""
