"""The tests' redis-server: :mod:`deposium.bench.procs` (one helper for the tests and the bench)."""

from deposium.bench.procs import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]
