"""Benchmarks: ``python -m benchmarks`` (``make bench``) measures anyserve's request
path against bare single hops on this machine, in one run, and prints one table
per benchmark module (every ``benchmarks.bench_*`` module with a ``run()``).
"""
