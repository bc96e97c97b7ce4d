"""Download a published artifact (tar.gz) and verify it, for the Dockerfile's `artifact-download` stage.

Why: building the artifact in the image needs torch (~1 GB) and minutes of conversion on every
cache miss (e.g. on Railway). An artifact converted once, published (object storage, release
asset) and pinned by sha256 makes the image build torch-free and fast, and the sha256 makes a
swapped or truncated download fail the build instead of reaching a worker.
Usage: python fetch_artifact.py URL SHA256 OUT_DIR [ARTIFACT_FROM]
With ARTIFACT_FROM other than ``artifact-download`` it only creates an empty OUT_DIR: the legacy
builder (no BuildKit) runs every stage, including this unused one.
The tarball holds the artifact's files at its root or in one top-level directory.
"""

import hashlib
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path


def main(url: str, sha256: str, out: Path) -> None:
    if not url or len(sha256) != 64:
        sys.exit("artifact-download: give ARTIFACT_URL and its ARTIFACT_SHA256 (64 hex digits)")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "artifact.tar.gz"
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as fh:
            while block := response.read(1 << 20):
                digest.update(block)
                fh.write(block)
        if digest.hexdigest() != sha256.lower():
            sys.exit(f"artifact-download: sha256 mismatch for {url}: got {digest.hexdigest()}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archive) as tar:
            # Only plain files and directories inside the target (tarfile's `filter="data"` is
            # missing from Debian's Python 3.11.2).
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    sys.exit(f"artifact-download: refusing archive member {member.name!r}")
            tar.extractall(unpacked)
        entries = list(unpacked.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else unpacked
        if not (root / "manifest.json").is_file():
            sys.exit("artifact-download: the archive holds no manifest.json (not a deposium artifact)")
        shutil.copytree(root, out)
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    names = sorted(p.name for p in out.iterdir())
    print(f"artifact-download: {url} (sha256 {sha256[:12]}) -> {out}: {names}")


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[4] != "artifact-download":
        Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
        print(f"artifact-download: not used (ARTIFACT_FROM={sys.argv[4]})")
    else:
        main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
