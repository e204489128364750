"""Shared library for any-order ARMs and marginalization models."""
