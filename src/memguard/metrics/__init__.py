"""Measures of what a model reproduces."""
