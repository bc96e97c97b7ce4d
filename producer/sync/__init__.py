"""``--sync``: keep a store in step with a changing collection, with the store as the only record.

A sync embeds only text the store does not hold yet, rewrites only documents whose extracted
text changed, and deletes what vanished from the sources. Its state is the store itself (each
document's text hash beside its rows), so a killed sync re-run with the same command recomputes
the same plan from what was committed and converges; no second database records what was indexed.
See docs/sync.md for the workflow and the design (ids, atomicity, refusals).
"""

from deposium.producer.sync.engine import SyncRunner, SyncSummary
from deposium.producer.sync.store import SyncIndex, SyncStore, open_sync_store

__all__ = ["SyncIndex", "SyncRunner", "SyncStore", "SyncSummary", "open_sync_store"]
