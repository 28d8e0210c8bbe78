"""The merge-quality study: ``python -m benchmarks.quality.run_study`` (see README.md here)."""
