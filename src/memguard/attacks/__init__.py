"""Attacks that try to get memorized content or prohibited concepts out of a model."""
