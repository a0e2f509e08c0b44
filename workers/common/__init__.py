"""Pieces every worker shares: the engine interface and the worker runtime (registration, serving)."""
