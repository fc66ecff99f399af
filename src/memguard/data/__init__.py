"""Benchmark data, image folders and text encoders."""
