"""``edgetune bench``: benchmarks a user runs on their own machine (``benchmarks/`` has the
ones that only developers run). Each writes its numbers as JSON and a markdown section."""
