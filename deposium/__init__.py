"""deposium: batch ingestion of document collections into vectors on small CPUs.

The installed subpackages map the repository's top-level folders: ``deposium.worker`` (the
Celery worker and the one ``Embedder``), ``deposium.producer`` (documents to a sink),
``deposium.convert`` (building and validating the artifact) and ``deposium.bench`` (measurement).
"""
