"""Maintenance tools: builders of the embedded models."""
