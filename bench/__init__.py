"""``deposium.bench``: everything that measures the product, kept out of the runtime packages.

``deposium-bench`` (:mod:`.cli`) runs every speed figure side by side and files a report per model x
CPU class (``bench-results/<model>-<cpu class>.md``; ``--update-docs PAGE`` replaces that pair's table
in a docs page). The focused tools run as ``python -m deposium.bench.<name>``:

- ``job_speed``: one job end to end, local mode and through Redis with 1 and 2 worker processes;
- ``sink_speed``: rows/s per vector store alone, and a job's rate per store against Parquet;
- ``producer_cost``: the producer's CPU per paragraph, part by part, in a real queued job, beside
  redis-server's and the worker's, and how many worker cores one producer core keeps busy;
- ``worker_memory``: a worker's single-core throughput, its arena/RSS behaviour, and a real Celery
  worker's RSS and PSS per process;
- ``compare_artifacts``, ``profile_artifact``, ``int8_gemm_floor``, ``gemma_recipes``: recipe decisions
  (artifacts side by side, where a query's time goes, the int8 GEMM floor, quantization variants).

:mod:`.procs` starts the processes around the product (redis-server, Celery workers, a PostgreSQL
cluster with pgvector) for the bench and the test suite alike; :mod:`.gemma` builds the random-weight
EmbeddingGemma-layout models both use.

Why a package of its own: the bench times the very :class:`deposium.worker.embedder.Embedder` the
Celery workers run, so it imports worker, producer and convert; none of those ever imports it, and
the worker image does not need it. The peers it compares against (torch, sentence-transformers,
the converter) are imported lazily inside the functions that use them; importing ``deposium.bench``
(or its corpus/stats/report modules) never imports torch.
"""
