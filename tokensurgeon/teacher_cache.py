"""Teacher cache: what a trainer needs of a frozen teacher (target) model, computed once
and reused by every method, seed and epoch.

Boundary: file I/O and hashing only; what is cached is computed by a function the trainer
hands in, and the trainer names the flag the directory came from (``--teacher-cache``,
``--target-cache``), so every message speaks of the flag the user typed. ``distill`` stores
two numbers per teacher token (log p(token t | tokens < t) and log p(boundary set | tokens
<= t) at chunk ends); ``spec train`` stores the target's top-k logits per position.

Layout of DIR:
- ``cache.json``: the key (SHA-256 of the teacher's config and weight files, the teacher
  token ids of every example, and the options that change the statistics) and what went
  into it. Opening DIR with another key is a one-line error.
- ``shard-NNNNN.safetensors``: examples ``[N * S, (N + 1) * S)``; two float32 tensors,
  ``realised`` and ``boundary`` (all examples' values end to end), and ``offsets`` (int64,
  [n + 1]); the header metadata repeats the key, so a shard from another cache is refused too.
Shards are filled on first use and written to a temporary name, then renamed: a run killed
half-way leaves only whole shards (and ignored temporaries), never a partial one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokensurgeon.errors import UsageError

MANIFEST = "cache.json"
FORMAT = 1

Statistics = tuple[torch.Tensor, torch.Tensor]
"""(realised [T], boundary [T]) float32 of one example's teacher tokens."""


def model_fingerprint(directory: str | Path) -> str:
    """SHA-256 of a model directory's ``config.json`` and weight files."""
    h = hashlib.sha256()
    directory = Path(directory)
    for path in [directory / "config.json", *sorted(directory.glob("*.safetensors")),
                 *sorted(directory.glob("*.gguf"))]:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def data_fingerprint(rows: Sequence[Sequence[int]]) -> str:
    """SHA-256 of integer rows (each example's teacher token ids and chunk ids), in order."""
    h = hashlib.sha256()
    for row in rows:
        h.update(torch.tensor(row, dtype=torch.int64).numpy().tobytes() + b"|")
    return h.hexdigest()


def cache_key(teacher: str, data: str, options: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, "teacher": teacher, "data": data,
                                      "options": options}, sort_keys=True).encode()).hexdigest()


class TeacherCache:
    """Per-example teacher statistics in ``directory``, filled shard by shard on demand.

    Args:
        directory: the cache directory (created if missing).
        teacher: :func:`model_fingerprint` of the teacher.
        data: :func:`data_fingerprint` of the examples.
        options: everything else the statistics depend on (JSON-serialisable).
        num_examples: examples in the data.
        shard_size: examples per shard.
        flag: the option that named ``directory``, as messages give it.
    Raises:
        UsageError: ``directory`` holds a cache made with another teacher, data or options.
    """

    def __init__(self, directory: str | Path, teacher: str, data: str, options: dict,
                 num_examples: int, shard_size: int = 64, flag: str = "--teacher-cache"):
        self.flag = flag
        self.directory = Path(directory).expanduser()
        self.key = cache_key(teacher, data, options)
        self.num_examples, self.shard_size = num_examples, shard_size
        self._shards: dict[int, list[Statistics]] = {}
        self.computed_examples = 0
        manifest = {"format": FORMAT, "key": self.key, "teacher": teacher, "data": data,
                    "options": options, "num_examples": num_examples, "shard_size": shard_size}
        path = self.directory / MANIFEST
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("key") != self.key or saved.get("shard_size") != shard_size:
                differs = [k for k in ("teacher", "data", "options", "shard_size", "format")
                           if saved.get(k) != manifest[k]] or ["its manifest"]
                raise UsageError(
                    f"{flag} {directory} was made for another {', '.join(differs)}; "
                    "pass a new directory (or delete this one)")
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {flag} {directory} ({exc.strerror}); "
                             "choose a writable directory") from None
        if any(self.directory.glob("shard-*.safetensors")):
            raise UsageError(f"{flag} {directory} holds shards but no {MANIFEST}; "
                             "pass a new directory (or delete this one)")
        _atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.safetensors"

    def _load(self, shard: int) -> list[Statistics] | None:
        path = self.shard_path(shard)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != self.key:
                raise UsageError(f"{path} belongs to another teacher cache; pass a new "
                                 f"{self.flag} directory (or delete this one)")
            realised, boundary = f.get_tensor("realised"), f.get_tensor("boundary")
            offsets = f.get_tensor("offsets").tolist()
        return [(realised[a:b], boundary[a:b]) for a, b in itertools.pairwise(offsets)]

    def _save(self, shard: int, stats: list[Statistics]) -> None:
        offsets = [0]
        for r, _ in stats:
            offsets.append(offsets[-1] + r.numel())
        path = self.shard_path(shard)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"realised": torch.cat([r for r, _ in stats]).float().contiguous(),
                   "boundary": torch.cat([b for _, b in stats]).float().contiguous(),
                   "offsets": torch.tensor(offsets, dtype=torch.int64)}, str(tmp),
                  metadata={"key": self.key, "first": str(shard * self.shard_size),
                            "count": str(len(stats))})
        os.replace(tmp, path)

    def get(self, indices: Sequence[int],
            compute: Callable[[list[int]], list[Statistics]]) -> list[Statistics]:
        """Statistics of examples ``indices``; missing shards are computed by
        ``compute(example indices) -> statistics``, written, then served."""
        missing = []
        for shard in dict.fromkeys(i // self.shard_size for i in indices):
            if shard not in self._shards:
                stats = self._load(shard)
                if stats is None:
                    missing.append(shard)
                else:
                    self._shards[shard] = stats
        if missing:  # one compute call for every missing shard's examples
            members = [list(range(k * self.shard_size,
                                  min((k + 1) * self.shard_size, self.num_examples)))
                       for k in missing]
            stats = compute([i for m in members for i in m])
            self.computed_examples += len(stats)
            at = 0
            for shard, m in zip(missing, members):
                self._save(shard, stats[at:at + len(m)])
                self._shards[shard] = stats[at:at + len(m)]
                at += len(m)
        return [self._shards[i // self.shard_size][i % self.shard_size] for i in indices]

    def fill(self, compute: Callable[[list[int]], list[Statistics]]) -> int:
        """Compute every missing shard; return how many examples were computed."""
        before = self.computed_examples
        for shard in range((self.num_examples + self.shard_size - 1) // self.shard_size):
            self.get([shard * self.shard_size], compute)
            self._shards.pop(shard, None)
        return self.computed_examples - before


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
