"""Retryable units of I/O used by the flows (and, as plain functions, by the CLI)."""
