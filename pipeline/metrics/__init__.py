"""Metric maths: plain functions on arrays and files, free of process groups, so each is tested alone."""
