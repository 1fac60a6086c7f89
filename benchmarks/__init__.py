"""Speed and peak-memory benchmarks of fastap against the dense formulations.

Run with ``pytest benchmarks/ --benchmark-only`` (they are outside ``tests/`` so that
``pytest tests/`` never runs them); see ``benchmarks/conftest.py`` for the knobs.
"""
