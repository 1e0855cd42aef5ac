"""Trackstar Mirror: a complete, queryable, time-travelling PostgreSQL copy of Trackstar data."""

__version__ = "0.1.0"
