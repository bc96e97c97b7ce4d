"""Request and result payloads of the ``deposium.embed_batch`` task (see docs/design.md).

Why explicit validation: anyone who can write to the Redis queue can forge a payload.
A forged or stale message must become a clear, permanent task failure — never a crash
of the worker process, never a silent misinterpretation (unknown fields are errors, so
a producer newer than its workers fails loudly instead of losing an option).
Vectors travel as little-endian bytes (4 bytes per value for float32): a msgpack
``bin`` is ~3x smaller and far cheaper to decode than a list of floats.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

WIRE_VERSION = 1
TASK_NAME = "deposium.embed_batch"

#: Little-endian wire dtypes by name.
WIRE_DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2"}

#: Job and batch ids: short, printable, no ``:`` (the task id is ``job_id:batch_id``).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")

REQUEST_FIELDS = frozenset({"v", "job_id", "batch_id", "paragraphs", "task", "dim", "dtype"})
RESULT_FIELDS = frozenset(
    {"v", "job_id", "batch_id", "model_sha256", "dim", "dtype", "vectors"}
    | {"token_counts", "truncated", "errors"}
)


class WireError(ValueError):
    """A payload that does not follow the wire format (wrong version, types or fields).

    The message quotes parts of the forged payload, which may hold lone surrogates; those
    are escaped here, or storing the failure in the msgpack/JSON result backend would raise
    a second, unrelated EncodeError and hide this one.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.encode("utf-8", "backslashreplace").decode("utf-8"))


def task_id(job_id: str, batch_id: str) -> str:
    """Celery task id of a batch: re-sending or redelivering it overwrites the same result key."""
    return f"{job_id}:{batch_id}"


def _check_fields(payload: object, allowed: frozenset[str], what: str) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise WireError(f"{what} must be a mapping, got {type(payload).__name__}")
    unknown = sorted(str(k) for k in payload if k not in allowed)
    if unknown:
        raise WireError(f"{what} has unknown fields: {', '.join(unknown)}")
    missing = sorted(allowed - set(payload))
    if missing:
        raise WireError(f"{what} lacks fields: {', '.join(missing)}")
    if payload["v"] != WIRE_VERSION or type(payload["v"]) is not int:
        raise WireError(f"{what} has wire version {payload['v']!r}; this worker speaks {WIRE_VERSION}")
    return payload


def _check_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise WireError(f"{name} must be 1-128 characters of [A-Za-z0-9._-] (no ':'), got {value!r:.80}")
    return value


def _check_int(value: object, name: str) -> int:
    if type(value) is not int:
        raise WireError(f"{name} must be an integer, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class EmbedRequest:
    """One batch to embed. ``paragraphs`` items are not checked here: a non-string item is a
    per-paragraph error reported by the Embedder, so the rest of the batch still embeds."""

    job_id: str
    batch_id: str
    paragraphs: list[Any]
    task: str | None = None
    dim: int | None = None
    dtype: str = "float32"

    @property
    def task_id(self) -> str:
        return task_id(self.job_id, self.batch_id)

    def to_wire(self) -> dict[str, Any]:
        """Task keyword arguments."""
        return {
            "v": WIRE_VERSION,
            "job_id": self.job_id,
            "batch_id": self.batch_id,
            "paragraphs": list(self.paragraphs),
            "task": self.task,
            "dim": self.dim,
            "dtype": self.dtype,
        }

    @classmethod
    def from_wire(cls, payload: object) -> EmbedRequest:
        """Validate task keyword arguments (possibly forged) into a request."""
        p = _check_fields(payload, REQUEST_FIELDS, "embed request")
        paragraphs = p["paragraphs"]
        if not isinstance(paragraphs, list):
            raise WireError(f"paragraphs must be a list, got {type(paragraphs).__name__}")
        task = p["task"]
        if task is not None and not isinstance(task, str):
            raise WireError(f"task must be a string or null, got {type(task).__name__}")
        dim = p["dim"]
        if dim is not None:
            _check_int(dim, "dim")
        dtype = p["dtype"]
        # isinstance first: a forged list or dict is unhashable, and ``in`` would raise TypeError
        if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
            raise WireError(f"dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype!r:.40}")
        return cls(
            job_id=_check_id(p["job_id"], "job_id"),
            batch_id=_check_id(p["batch_id"], "batch_id"),
            paragraphs=paragraphs,
            task=task,
            dim=dim,
            dtype=dtype,
        )


@dataclass(frozen=True)
class EmbedResponse:
    """What a worker returns for one batch; ``vectors`` is (n, dim) in input order."""

    job_id: str
    batch_id: str
    model_sha256: str
    vectors: np.ndarray
    token_counts: list[int]
    truncated: list[bool]
    errors: list[str | None]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def dtype(self) -> str:
        return str(self.vectors.dtype)

    def to_wire(self) -> dict[str, Any]:
        """The task's return value (msgpack-friendly: bytes, ints, bools, strings)."""
        if self.dtype not in WIRE_DTYPES:
            raise WireError(f"cannot send vectors of dtype {self.dtype}")
        return {
            "v": WIRE_VERSION,
            "job_id": self.job_id,
            "batch_id": self.batch_id,
            "model_sha256": self.model_sha256,
            "dim": self.dim,
            "dtype": self.dtype,
            "vectors": np.ascontiguousarray(self.vectors, dtype=WIRE_DTYPES[self.dtype]).tobytes(),
            "token_counts": [int(c) for c in self.token_counts],
            "truncated": [bool(t) for t in self.truncated],
            "errors": list(self.errors),
        }

    @classmethod
    def from_wire(cls, payload: object) -> EmbedResponse:
        """Decode a task result, checking that every per-paragraph list matches the vectors."""
        p = _check_fields(payload, RESULT_FIELDS, "embed result")
        dtype = p["dtype"]
        if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
            raise WireError(f"result dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype!r:.40}")
        dim = _check_int(p["dim"], "dim")
        raw = p["vectors"]
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise WireError(f"vectors must be bytes, got {type(raw).__name__}")
        itemsize = np.dtype(WIRE_DTYPES[dtype]).itemsize
        lists = {name: p[name] for name in ("token_counts", "truncated", "errors")}
        for name, value in lists.items():
            if not isinstance(value, list):
                raise WireError(f"{name} must be a list, got {type(value).__name__}")
        n = len(lists["token_counts"])
        if dim <= 0 or len(raw) != n * dim * itemsize:
            raise WireError(f"vectors hold {len(raw)} bytes, expected {n} x {dim} x {itemsize}")
        if len(lists["truncated"]) != n or len(lists["errors"]) != n:
            raise WireError("token_counts, truncated and errors must have one entry per paragraph")
        if not all(type(c) is int for c in lists["token_counts"]):
            raise WireError("token_counts must be integers")
        if not all(type(t) is bool for t in lists["truncated"]):
            raise WireError("truncated must be booleans")
        if not all(e is None or isinstance(e, str) for e in lists["errors"]):
            raise WireError("errors must be strings or null")
        sha = p["model_sha256"]
        if not isinstance(sha, str):
            raise WireError("model_sha256 must be a string")
        vectors = np.frombuffer(bytes(raw), dtype=WIRE_DTYPES[dtype]).reshape(n, dim).astype(dtype)
        return cls(
            job_id=_check_id(p["job_id"], "job_id"),
            batch_id=_check_id(p["batch_id"], "batch_id"),
            model_sha256=sha,
            vectors=vectors,
            token_counts=lists["token_counts"],
            truncated=lists["truncated"],
            errors=lists["errors"],
        )
