"""Observability: per-request exchange records, metrics, access log."""
