"""Researchers' labels and notes for latents, kept in the store with every revision.

A label belongs to an SAE's latent, not to one analysis of it (an SAE analysed again keeps its
labels), so revisions live under ``labels/<sae_id>/<latent>/``, one JSON object per revision,
named ``<revision, 8 digits>-<nonce>.json`` and never overwritten. Nothing is ever lost: an
update is a new object. The current label is the revision with the highest number (ties, which
only two servers writing at the same instant can make, go to the later time, then the larger
nonce, so every reader agrees).

Updates are optimistic (AIP-154): a writer names the revision it edited by its etag, and one
made stale by another writer's update in between is refused with the current revision, so the
second browser sees the first one's words instead of erasing them.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from vitscope.store import Store

FORMAT_VERSION = 1
PREFIX = "labels"
MAX_TEXT = 200
MAX_NOTES = 4000
MAX_AUTHOR = 100
REFRESH_S = 2.0
"""How stale a reader's view of other servers' writes may be (a server sees its own at once)."""


@dataclass(frozen=True)
class LabelRevision:
    """One revision of a latent's label, as stored."""

    sae_id: str
    latent: int
    revision: int
    text: str
    notes: str
    author: str
    time: float  # Unix seconds, set by the server
    nonce: str
    version: int = FORMAT_VERSION

    @property
    def key(self) -> str:
        return f"{PREFIX}/{self.sae_id}/{self.latent}/{self.revision:08d}-{self.nonce}.json"

    @property
    def etag(self) -> str:
        return f"{self.revision}-{self.nonce}"

    def order(self) -> tuple[int, float, str]:
        """What 'newest' means, the same for every reader."""
        return self.revision, self.time, self.nonce


class LabelConflict(Exception):
    """An update whose etag is not the current revision's: someone else wrote in between."""

    def __init__(self, current: LabelRevision | None):
        self.current = current
        who = f" by {current.author or 'someone'}" if current else ""
        super().__init__(f"the label was changed{who} since it was read (now revision "
                         f"{current.revision if current else 0}, etag {current.etag if current else ''!r}): "
                         "reload it and apply your edit again")


class LabelError(ValueError):
    """A label that breaks the limits on its fields."""


class LabelBook:
    """The labels of one store's SAEs, read once and kept in memory, with new revisions picked
    up by listing the SAE's prefix at most every :data:`REFRESH_S` seconds."""

    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._revisions: dict[str, dict[int, list[LabelRevision]]] = {}  # sae -> latent -> oldest first
        self._seen: dict[str, set[str]] = {}
        self._synced: dict[str, float] = {}

    def _sync(self, sae_id: str, force: bool = False) -> dict[int, list[LabelRevision]]:
        with self._lock:
            fresh = time.monotonic() - self._synced.get(sae_id, -float("inf")) < REFRESH_S
            if fresh and not force:
                return self._revisions.setdefault(sae_id, {})
        keys = self.store.list(f"{PREFIX}/{sae_id}/")
        with self._lock:
            seen = self._seen.setdefault(sae_id, set())
            new = [k for k in keys if k.endswith(".json") and k not in seen]
        loaded = [_from_json(self.store.get_bytes(k)) for k in new]
        with self._lock:
            book = self._revisions.setdefault(sae_id, {})
            for key, rev in zip(new, loaded, strict=True):
                seen.add(key)
                book.setdefault(rev.latent, []).append(rev)
            for latent in {rev.latent for rev in loaded}:
                book[latent].sort(key=LabelRevision.order)
            self._synced[sae_id] = time.monotonic()
            return book

    def current(self, sae_id: str, latent: int) -> LabelRevision | None:
        """The latent's label now, or None when it was never labelled."""
        revisions = self._sync(sae_id).get(latent)
        return revisions[-1] if revisions else None

    def revisions(self, sae_id: str, latent: int) -> list[LabelRevision]:
        """Every revision of the latent's label, newest first."""
        return list(reversed(self._sync(sae_id).get(latent, [])))

    def labelled(self, sae_id: str) -> dict[int, LabelRevision]:
        """The current label of every labelled latent of the SAE."""
        return {latent: revs[-1] for latent, revs in self._sync(sae_id).items() if revs}

    def search(self, sae_id: str, query: str) -> dict[int, LabelRevision]:
        """Labelled latents whose text or notes contain every word of ``query``, case-insensitive
        (``"*"``: every labelled latent)."""
        words = [] if query.strip() == "*" else query.lower().split()
        return {latent: rev for latent, rev in self.labelled(sae_id).items()
                if all(w in f"{rev.text}\n{rev.notes}".lower() for w in words)}

    def update(self, sae_id: str, latent: int, text: str, notes: str, author: str, etag: str) -> LabelRevision:
        """Write the next revision, if ``etag`` is the current one's ("" for a first label).

        Raises :class:`LabelConflict` when it is not and :class:`LabelError` for fields over
        their limits."""
        for field, value, most in (("text", text, MAX_TEXT), ("notes", notes, MAX_NOTES), ("author", author, MAX_AUTHOR)):
            if len(value) > most:
                raise LabelError(f"label {field} is {len(value)} characters: at most {most}")
        # One writer at a time in this server, and a fresh listing first, so that an etag is
        # checked against what any server has written, not against this cache.
        with self._write_lock:
            current = (self._sync(sae_id, force=True).get(latent) or [None])[-1]
            if etag != (current.etag if current else ""):
                raise LabelConflict(current)
            rev = LabelRevision(sae_id=sae_id, latent=latent, revision=(current.revision if current else 0) + 1,
                                text=text, notes=notes, author=author, time=time.time(), nonce=uuid.uuid4().hex[:12])
            self.store.put_bytes(rev.key, json.dumps(asdict(rev), sort_keys=True).encode())
            with self._lock:
                self._seen.setdefault(sae_id, set()).add(rev.key)
                self._revisions.setdefault(sae_id, {}).setdefault(latent, []).append(rev)
                self._revisions[sae_id][latent].sort(key=LabelRevision.order)
            return rev


def _from_json(data: bytes) -> LabelRevision:
    raw = json.loads(data)
    if raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"label format {raw.get('version')} is not one this version reads ({FORMAT_VERSION})")
    return LabelRevision(**raw)
