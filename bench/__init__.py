"""Benchmarks and measurements (commands that print tables); their short versions run in the tests."""
