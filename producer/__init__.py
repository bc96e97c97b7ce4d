"""producer: documents → paragraphs → batches → embeddings in a sink, durably and resumably.

``submit`` is the library entry point; ``deposium-submit`` / ``deposium-jobs`` the CLIs.
"""

from deposium.producer.api import JobHandle, submit

__all__ = ["JobHandle", "submit"]
