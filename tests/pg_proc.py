"""The tests' PostgreSQL cluster with pgvector: :mod:`deposium.bench.procs` (one helper for the tests and the bench)."""

from deposium.bench.procs import PgCluster, find_bindir, pgvector_installed

__all__ = ["PgCluster", "find_bindir", "pgvector_installed"]
