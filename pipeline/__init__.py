"""How it runs: the only package that imports Ray.

Wiring of the stage graph, the two executors (Ray actors, or threads in one process), bounded
in-flight backpressure, error propagation, the job runners and the CLI.
"""
