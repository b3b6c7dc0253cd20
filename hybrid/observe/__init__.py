"""Seeing what hybrid does: status, flow and top views, Prometheus metrics, doctor. Reads; never decides."""
