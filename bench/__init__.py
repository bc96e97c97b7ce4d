"""``deposium-bench``: every speed claim of this project, measured side by side in one run.

Why a package under ``worker``: the bench times the very :class:`deposium.worker.embedder.Embedder`
the Celery workers run. It is a developer tool, so the peers it compares against (torch,
sentence-transformers, the converter) are imported lazily inside the functions that use
them; importing ``deposium.bench`` (or its corpus/stats/report modules) never imports torch.
"""
