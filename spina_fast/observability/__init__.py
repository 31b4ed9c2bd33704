"""Metrics, tracing and scrape-configuration helpers."""
