"""Differential privacy and secure aggregation (filled in by the DP and SecAgg work)."""
