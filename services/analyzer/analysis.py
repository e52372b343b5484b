"""One ordered pass of an SAE over its activation set: per-latent statistics and top-k images."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from vitscope.device import resolve_device
from vitscope.sae import Sae, SaeRecord, load_sae_from
from vitscope.shards import ActivationSet, Manifest, part_block
from vitscope.store import Store, open_store

from .config import AnalyzeConfig
from .results import (
    ACTIVATION_LOG10_EDGES,
    COFIRE_PER_TOKEN,
    COFIRE_TOKENS,
    COFIRE_TOP,
    SAMPLE_LOG10_EDGES,
    SAMPLES_PER_BAND,
    VIEWS,
    AnalysisManifest,
    CoFiringTable,
    LatentTable,
    TopImages,
    analysis_exists,
    analysis_id,
    analysis_prefix,
    default_view,
    save_analysis,
)

log = logging.getLogger(__name__)


@dataclass
class AnalyzeResult:
    """An analysis by id: ``reused`` when it was already published, ``published`` False for a
    part of a split analysis (published by the ``finish`` step)."""

    analysis_id: str
    reused: bool
    published: bool = True


def _rank_key(score: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """One int64 per (score, image) that orders top images: the higher score first, then the
    lower image index (so ties never depend on the order of merges); -1 for an empty slot or
    a score that is not positive, which is no example of the latent. The bits of a positive
    float32, read as an integer, order like its value; image indices are below 2^31."""
    key = (score.float().view(torch.int32).to(torch.int64) << 32) | (0x7FFFFFFF - image)
    return torch.where((score > 0) & (image >= 0), key, -1)


class TopK:
    """Running top-k per latent of (score, image, patch) with an associative merge, so that
    partial results from several workers combine into the same answer as one pass. An example
    is kept as its :func:`_rank_key`, which holds its score and image, and its patch: a merge is
    then one ``topk`` of integers per latent."""

    def __init__(self, d_sae: int, k: int, device: torch.device):
        self.key = torch.full((d_sae, k), -1, dtype=torch.int64, device=device)
        self.patch = torch.full((d_sae, k), -1, dtype=torch.int32, device=device)

    def merge(self, score: torch.Tensor, image: torch.Tensor, patch: torch.Tensor) -> None:
        """Merge candidates [d_sae, n] (each image at most once per latent across all merges)."""
        self.merge_keys(_rank_key(score, image), patch)

    def merge_keys(self, key: torch.Tensor, patch: torch.Tensor) -> None:
        """Merge candidates given by their :func:`_rank_key` (another part's :attr:`key`)."""
        top, at = torch.cat([self.key, key], dim=1).topk(self.key.shape[1], dim=1)
        # Keys are distinct but for the -1 of empty slots, which have no patch.
        self.patch = torch.cat([self.patch, patch.to(self.patch.dtype)], dim=1).gather(1, at).masked_fill(top < 0, -1)
        self.key = top

    def examples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(score, image, patch) [d_sae, k] of the kept examples, the best first; an empty slot
        (the latent fired on fewer images) has score 0, image -1 and patch -1."""
        empty = self.key < 0
        score = (self.key >> 32).to(torch.int32).view(torch.float32).masked_fill(empty, 0)
        return score, (0x7FFFFFFF - (self.key & 0x7FFFFFFF)).masked_fill(empty, -1), self.patch

    def load(self, score: torch.Tensor, image: torch.Tensor, patch: torch.Tensor) -> None:
        """Take the examples :meth:`examples` gave."""
        self.key = _rank_key(score, image)
        self.patch = patch.masked_fill(self.key < 0, -1)

    def result(self) -> TopImages:
        """The top images as published."""
        return TopImages(*(t.cpu().numpy() for t in self.examples()))


_NO_KEY = torch.iinfo(torch.int64).max  # an empty slot sorts after every candidate


def sample_priority(images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A pseudo-random priority in [0, 2^31) per (image, latent), the same in every run, part
    and order: the band samples keep the images of smallest priority, a uniform draw that
    needs no random state to merge."""
    h = (images.to(torch.int64) * 0x9E3779B1) ^ (latents.to(torch.int64) * 0x85EBCA77)
    h = (h ^ (h >> 15)) * 0x2C1B3C6D
    return (h ^ (h >> 12)) & 0x7FFFFFFF


class BandSamples:
    """Per latent, a few images from each band of activation (:data:`SAMPLE_LOG10_EDGES`, by
    the image's best-patch activation): typical examples at every strength, not only the top.
    Each band keeps the ``per_band`` images of smallest :func:`sample_priority` (ties: the
    lower image index), so the result is a uniform, reproducible draw that merges
    associatively whatever the batches' order."""

    def __init__(self, d_sae: int, per_band: int, device: torch.device):
        self.per_band = per_band
        self.bands = len(SAMPLE_LOG10_EDGES) - 1
        self.inner = torch.as_tensor(SAMPLE_LOG10_EDGES[1:-1], dtype=torch.float64, device=device)
        slots = self.bands * per_band
        self.key = torch.full((d_sae, slots), _NO_KEY, dtype=torch.int64, device=device)
        self.image = torch.full((d_sae, slots), -1, dtype=torch.int64, device=device)
        self.score = torch.zeros(d_sae, slots, device=device)
        self.patch = torch.full((d_sae, slots), -1, dtype=torch.int32, device=device)

    def merge(self, score: torch.Tensor, image: torch.Tensor, patch: torch.Tensor) -> None:
        """Merge candidates [d_sae, n] (each image at most once per latent across all merges)."""
        d_sae, n = score.shape
        band = torch.bucketize(score.double().clamp_min(1e-30).log10().contiguous(), self.inner, right=True)
        prio = sample_priority(image, torch.arange(d_sae, device=score.device)[:, None].expand(d_sae, n))
        key = torch.where(score > 0, (band << 32) | prio, torch.full_like(prio, _NO_KEY))
        # A band keeps its samples in (key, image) order, so a candidate can only enter where it
        # precedes the band's last one (a free slot holds _NO_KEY); only those latents re-sort.
        last = band * self.per_band + self.per_band - 1
        bar_key, bar_image = self.key.gather(1, last), self.image.gather(1, last)
        enter = (key < bar_key) | ((key == bar_key) & (image < bar_image))
        rows = enter.any(dim=1).nonzero().squeeze(1)
        if not len(rows):
            return
        keys = torch.cat([self.key[rows], key[rows].masked_fill(~enter[rows], _NO_KEY)], dim=1)
        images = torch.cat([self.image[rows], image[rows]], dim=1)
        # Priorities are 31-bit hashes and can collide: ties go to the lower image index
        # (stable sorts, the last key first), whatever the order of the merges.
        by_image = images.argsort(dim=1, stable=True)
        order = by_image.gather(1, keys.gather(1, by_image).argsort(dim=1, stable=True))
        keys = keys.gather(1, order)
        # A candidate's rank within its band: its position after the band's first candidate.
        band_of = keys >> 32
        rank = torch.arange(keys.shape[1], device=keys.device) - torch.searchsorted(band_of, band_of)
        keep = (rank < self.per_band) & (keys != _NO_KEY)
        slots = self.key.shape[1]
        slot = torch.where(keep, band_of * self.per_band + rank, torch.full_like(rank, slots))  # slots: dropped
        candidates = {"key": keys, "image": images.gather(1, order),
                      "score": torch.cat([self.score[rows], score[rows]], 1).gather(1, order),
                      "patch": torch.cat([self.patch[rows], patch[rows].to(self.patch.dtype)], 1).gather(1, order)}
        for name, empty in (("key", _NO_KEY), ("image", -1), ("score", 0), ("patch", -1)):
            kept = getattr(self, name)
            out = torch.full((len(rows), slots + 1), empty, dtype=kept.dtype, device=kept.device)
            kept[rows] = out.scatter_(1, slot, candidates[name].to(kept.dtype))[:, :slots]

    def result(self) -> TopImages:
        """The samples as published, [d_sae, bands, per_band] each; empty slots have image -1."""
        shape = (-1, self.bands, self.per_band)
        return TopImages(self.score.cpu().numpy().astype(np.float32).reshape(shape),
                         self.image.cpu().numpy().reshape(shape), self.patch.cpu().numpy().reshape(shape))


def cofiring_images(n_images: int, tokens_per_image: int, budget: int = COFIRE_TOKENS) -> torch.Tensor:
    """The images whose tokens co-firing is counted on: a fixed pseudo-random choice (the images
    of smallest :func:`sample_priority`) of about ``budget`` tokens' worth, the same however the
    pass is split. A bool mask over the set's images."""
    prio = sample_priority(torch.arange(n_images), torch.full((n_images,), -1))
    keep = torch.zeros(n_images, dtype=torch.bool)
    keep[prio.argsort(stable=True)[: max(1, budget // max(tokens_per_image, 1))]] = True
    return keep


class CoFiring:
    """Pair counts of latents firing on the same token, over the tokens of the co-firing images
    (:func:`cofiring_images`). Each token counts the pairs among its ``per_token`` strongest
    latents (bounding the work for dense codes); counts add up across batches and parts."""

    def __init__(self, d_sae: int, per_token: int = COFIRE_PER_TOKEN):
        self.d_sae, self.per_token = d_sae, per_token
        self.keys: list[torch.Tensor] = []
        self.fires = torch.zeros(d_sae, dtype=torch.int64)

    def add(self, z: torch.Tensor) -> None:
        """Count the firing latents of codes ``z`` [tokens, d_sae] and their pairs."""
        if not len(z):
            return
        vals, idx = z.topk(min(self.per_token, self.d_sae), dim=1)
        idx = torch.where(vals > 0, idx, torch.full_like(idx, -1)).cpu()
        fired = idx[idx >= 0]
        self.fires += torch.bincount(fired, minlength=self.d_sae)
        a, b = idx[:, :, None], idx[:, None, :]
        pair = (a >= 0) & (b > a)  # each unordered pair once
        # Kept as they come: the sample bounds them (COFIRE_TOKENS x per_token^2 / 2 keys at most),
        # and one count at the end is cheaper than one per batch.
        self.keys.append((a * self.d_sae + b).expand(pair.shape)[pair])

    def result(self, top: int = COFIRE_TOP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per latent, its ``top`` co-firing latents by Jaccard index (ties: the lower index):
        (latent int32 [d_sae, top], jaccard float32, count int64); unused slots have latent -1."""
        d = self.d_sae
        out_latent = np.full((d, top), -1, dtype=np.int32)
        out_jaccard = np.zeros((d, top), dtype=np.float32)
        out_count = np.zeros((d, top), dtype=np.int64)
        if not self.keys:
            return out_latent, out_jaccard, out_count
        keys, counts = torch.unique(torch.cat(self.keys), return_counts=True)  # pairs (a, b), a < b, in order
        a, b = keys // d, keys % d
        # Both orders of each pair: a latent's partners are on either side. The (b, a) pairs,
        # put in (b, a) order, go first, so that within each latent its partners ascend.
        flip = (b * d + a).argsort()
        i, j, counts = torch.cat([b[flip], a]), torch.cat([a[flip], b]), torch.cat([counts[flip], counts])
        union = self.fires[i] + self.fires[j] - counts
        # Jaccard indices are fractions whose denominators are at most u = 2 * max(fires): two
        # different ones differ by at least 1/u^2, so floor(jaccard * 2^s) with 2^s > 2u^2 keeps
        # their order and ties exactly, in integers (the sample keeps fires near COFIRE_TOKENS,
        # so the keys stay far within int64). One stable sort by (latent, Jaccard descending)
        # then leaves the partners of equal Jaccard in ascending order.
        s = 2 * int(2 * self.fires.max()).bit_length() + 1
        descending = (1 << s) - (counts << s) // union
        order = torch.argsort((i << (s + 1)) | descending, stable=True)
        i = i[order]
        per_latent = torch.bincount(i, minlength=d)
        rank = torch.arange(len(i)) - (per_latent.cumsum(0) - per_latent)[i]
        keep = (rank < top).nonzero().squeeze(1)
        i, rank, pick = i[keep].numpy(), rank[keep].numpy(), order[keep]
        out_latent[i, rank] = j[pick].numpy()
        out_jaccard[i, rank] = (counts[pick].double() / union[pick].double()).numpy()
        out_count[i, rank] = counts[pick].numpy()
        return out_latent, out_jaccard, out_count


class ActivationHistogram:
    """Per latent, how many tokens it fired on in each activation bin
    (:data:`ACTIVATION_LOG10_EDGES`): counts add up across batches and parts."""

    def __init__(self, d_sae: int, device: torch.device):
        self.inner = torch.as_tensor(ACTIVATION_LOG10_EDGES[1:-1], dtype=torch.float64, device=device)
        self.bins = len(ACTIVATION_LOG10_EDGES) - 1
        self.counts = torch.zeros(d_sae * self.bins, dtype=torch.int64, device=device)

    def add(self, latent: torch.Tensor, value: torch.Tensor) -> None:
        """Count firings, given as the latent and the value of each nonzero code."""
        # float64 and [a, b) bins, so that a value on an edge lands where numpy.histogram puts it
        bins = torch.bucketize(value.double().log10(), self.inner, right=True)
        self.counts += torch.bincount(latent * self.bins + bins, minlength=len(self.counts))

    def fires(self) -> torch.Tensor:
        """Per latent, the tokens it fired on (codes are non-negative: every count is a firing)."""
        return self.counts.view(-1, self.bins).sum(dim=1)

    def result(self) -> np.ndarray:
        """int64 [d_sae, bins], as published."""
        return self.counts.view(-1, self.bins).cpu().numpy()


SUM_SCALE = 2.0 ** 20
"""Activation sums are kept as integers in units of 2^-20 (each shard's float64 sum, rounded):
integer addition is associative, so the mean is bit for bit the same however the pass is split
into parts and in whatever order they merge; 2^-20 is far below float32's resolution of a
typical activation, and int64 holds sums up to ~8.8e12."""


class PassState:
    """What an analysis pass has accumulated over some of a set's shards, all of it mergeable
    exactly and in any order: fixed-point activation sums, maxima, histograms (which count the
    firings too), the top images of every view, band samples and co-firing pairs."""

    def __init__(self, d_sae: int, top_images: int, views: list[str], device: torch.device):
        self.act_sum = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.act_max = torch.zeros(d_sae, device=device)
        self.n_tokens = 0
        self.histogram = ActivationHistogram(d_sae, device)
        self.tops = {v: TopK(d_sae, top_images, device) for v in views}
        self.bands = BandSamples(d_sae, SAMPLES_PER_BAND, device)
        self.cofiring = CoFiring(d_sae)

    def merge(self, other: PassState) -> None:
        """Add another part's state (over other shards) to this one."""
        self.act_sum += other.act_sum
        self.act_max = torch.maximum(self.act_max, other.act_max)
        self.n_tokens += other.n_tokens
        self.histogram.counts += other.histogram.counts
        for view, top in self.tops.items():
            top.merge_keys(other.tops[view].key, other.tops[view].patch)
        self.bands.merge(other.bands.score, other.bands.image, other.bands.patch)
        self.cofiring.keys += other.cofiring.keys
        self.cofiring.fires += other.cofiring.fires

    def to_tensors(self) -> dict[str, torch.Tensor]:
        t = {"act_sum": self.act_sum, "act_max": self.act_max,
             "n_tokens": torch.tensor(self.n_tokens), "histogram": self.histogram.counts,
             "cofiring.keys": torch.cat(self.cofiring.keys) if self.cofiring.keys else torch.zeros(0, dtype=torch.int64),
             "cofiring.fires": self.cofiring.fires}
        for view, top in self.tops.items():
            t.update(zip((f"top.{view}.score", f"top.{view}.image", f"top.{view}.patch"), top.examples(), strict=True))
        t.update({"bands.score": self.bands.score, "bands.image": self.bands.image, "bands.patch": self.bands.patch,
                  "bands.key": self.bands.key})
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}

    def load(self, t: dict[str, torch.Tensor]) -> None:
        """Take the state :meth:`to_tensors` wrote."""
        device = self.act_sum.device
        self.act_sum, self.act_max = (t[k].to(device) for k in ("act_sum", "act_max"))
        self.n_tokens = int(t["n_tokens"])
        self.histogram.counts = t["histogram"].to(device)
        self.cofiring.keys, self.cofiring.fires = [t["cofiring.keys"]], t["cofiring.fires"]
        for view, top in self.tops.items():
            top.load(*(t[f"top.{view}.{k}"].to(device) for k in ("score", "image", "patch")))
        for k in ("score", "image", "patch", "key"):
            setattr(self.bands, k, t[f"bands.{k}"].to(device))


@dataclass(frozen=True)
class _Pass:
    """One analysis, resolved: the SAE, its set, and where its parts and results go."""

    store: Store
    sae: Sae
    record: SaeRecord
    aset: ActivationSet
    analysis_id: str
    top_images: int
    views: list[str]
    device: torch.device
    stat_tokens: int
    """Tokens per image the statistics are over (the kinds the SAE was trained on)."""
    cofire_images: torch.Tensor
    """The images co-firing is counted on (:func:`cofiring_images`), a bool mask."""

    def part_key(self, part: int, parts: int) -> str:
        return f"{analysis_prefix(self.analysis_id)}/parts/{parts}/{part}.safetensors"

    def part_shards(self, part: int, parts: int) -> range:
        """The contiguous block of shards that ``part`` of ``parts`` covers."""
        return part_block(len(self.aset.manifest.shards), part, parts)

    def new_state(self) -> PassState:
        return PassState(self.sae.cfg.d_sae, self.top_images, self.views, self.device)


def _resolve(cfg: AnalyzeConfig) -> _Pass | AnalyzeResult:
    if cfg.top_images <= 0:
        raise ValueError("top_images must be positive")
    if not 0 <= cfg.part < cfg.parts:
        raise ValueError(f"part {cfg.part} is not in 0..{cfg.parts - 1}")
    store = open_store(cfg.store)
    device = resolve_device(cfg.device)
    sae, record = load_sae_from(store, cfg.sae, device)
    aset = ActivationSet.open(store, record.activation_set_id)
    m = aset.manifest
    aid = analysis_id(record.sae_id, m.set_id, cfg.top_images)
    if analysis_exists(store, aid):
        log.info("analysis %s already published in %s: reusing it", aid, store.uri)
        return AnalyzeResult(aid, reused=True)
    if m.d_model != sae.cfg.d_in:
        raise ValueError(f"SAE expects d_in={sae.cfg.d_in} but activation set {m.set_id} has d={m.d_model}")
    views = [v for v in VIEWS if v != "cls" or m.layout.n_cls]
    stat_tokens = len(m.layout.token_indices(record.tokens))
    return _Pass(store, sae, record, aset, aid, min(cfg.top_images, len(aset)), views, device, stat_tokens,
                 cofiring_images(len(aset), stat_tokens).to(device))


CHUNK_BYTES = 8 << 20
"""The codes of about this many bytes are encoded and reduced at once: small enough to stay in
a CPU's cache between the encode that writes them and the passes that read them (a batch's
codes, hundreds of MB, would be read back from memory by each pass), large enough for an
efficient matrix product. The sums are over chunks, so the published means depend on it."""


class _Batch:
    """What the per-latent bookkeeping needs of one batch of images, gathered from the dense
    codes chunk by chunk (:meth:`scan`) so that the codes never exist for the whole batch:
    per image the maximum over the statistics tokens and over the patches, the patch mean and
    the CLS code; the nonzero entries of the statistics tokens and of the patches."""

    def __init__(self, m: Manifest, rows: int, positions: np.ndarray, d_sae: int, device: torch.device):
        layout = m.layout
        self.tokens = layout.tokens_per_image
        self.patch_start, self.n_patches = layout.patch_start, layout.n_patches
        self.n_cls = layout.n_cls
        self.stat_tokens = len(positions)
        self.stat_slice = _contiguous(positions)
        self.stat_positions = torch.as_tensor(positions, device=device)
        self.separate_patches = self.stat_slice != slice(self.patch_start, self.tokens)
        # Per stored position: its index among the statistics tokens, -1 for the others.
        rank = np.full(self.tokens, -1, dtype=np.int64)
        rank[positions] = np.arange(len(positions))
        self.stat_rank = torch.as_tensor(rank, device=device)
        self.chunk = max(1, min(rows, CHUNK_BYTES // (self.tokens * d_sae * 4)))
        self.bfloat16 = m.dtype == "bfloat16"
        self.stage = np.empty((self.chunk, self.tokens, m.d_model), dtype=m.np_dtype)
        self.x = torch.empty(self.chunk, self.tokens, m.d_model, device=device)
        self.gathered = torch.empty(self.chunk, self.stat_tokens, d_sae, device=device) if self.stat_slice is None else None
        self.stat_max = torch.empty(rows, d_sae, device=device)
        self.patch_max = torch.empty(rows, d_sae, device=device) if self.separate_patches else self.stat_max
        self.mean = torch.empty(rows, d_sae, device=device)
        self.cls = torch.empty(rows, d_sae, device=device) if self.n_cls else None

    def _rows(self, a: np.ndarray) -> torch.Tensor:
        """Stored rows [n, T, d] as float32 (the conversion is exact, as from_storage's)."""
        n = len(a)
        np.copyto(self.stage[:n], a)  # memory-mapped pages are read-only, and torch wants writable ones
        stored = torch.from_numpy(self.stage[:n].view(np.int16) if self.bfloat16 else self.stage[:n])
        return self.x[:n].copy_(stored.view(torch.bfloat16) if self.bfloat16 else stored)

    def scan(self, sae: Sae, a: np.ndarray, sums: torch.Tensor, cofire: torch.Tensor, cofiring: CoFiring) -> None:
        """Encode the stored rows ``a`` [n, T, d] and keep what the batch needs; add the
        statistics tokens' sums to ``sums`` (float64) and the images chosen by ``cofire`` (a bool
        per row) to ``cofiring``."""
        n, d_sae = len(a), sums.shape[0]
        stat_entries, patch_entries = [], []
        for lo in range(0, n, self.chunk):
            hi = min(lo + self.chunk, n)
            z = sae.encode(self._rows(a[lo:hi]))  # [c, T, d_sae], contiguous
            if self.stat_slice is None:
                stats = torch.index_select(z, 1, self.stat_positions, out=self.gathered[:hi - lo])
            else:
                stats = z[:, self.stat_slice]
            # Over the tokens of each image first: a reduction over the innermost kept dimension
            # is several times faster on CPU than one over both leading dimensions at once.
            sums += stats.sum(dim=1).double().sum(dim=0)
            torch.amax(stats, dim=1, out=self.stat_max[lo:hi])
            patches = z[:, self.patch_start:]
            if self.separate_patches:
                torch.amax(patches, dim=1, out=self.patch_max[lo:hi])
            torch.mean(patches, dim=1, out=self.mean[lo:hi])
            if self.cls is not None:
                self.cls[lo:hi].copy_(z[:, 0])
            chosen = cofire[lo:hi]
            if chosen.any():
                cofiring.add(stats[chosen].reshape(-1, d_sae))
            # One scan of the chunk's codes finds the firings of both token sets.
            token, latent, value = _nonzero(z)
            image, position = token // self.tokens + lo, token % self.tokens
            rank = self.stat_rank[position]
            kept = (rank >= 0).nonzero().squeeze(1)
            stat_entries.append((image[kept] * self.stat_tokens + rank[kept], latent[kept], value[kept]))
            if self.separate_patches:
                kept = (position >= self.patch_start).nonzero().squeeze(1)
                patch_entries.append((image[kept] * self.n_patches + position[kept] - self.patch_start,
                                      latent[kept], value[kept]))
        self.stat_entries = tuple(torch.cat(t) for t in zip(*stat_entries, strict=True))
        self.patch_entries = (tuple(torch.cat(t) for t in zip(*patch_entries, strict=True))
                              if self.separate_patches else self.stat_entries)


def _contiguous(positions: np.ndarray) -> slice | None:
    """The token positions as a slice when they are a contiguous run (a view, not a gather)."""
    if len(positions) and (np.diff(positions) == 1).all():
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return None


def _nonzero(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, latent, value) of every nonzero entry of contiguous codes [..., d_sae], tokens
    counted in order over the leading dimensions: codes are sparse, so what needs every firing
    works on a few percent of the entries."""
    d_sae = codes.shape[-1]
    # Scanning the bits as integers is cheaper than comparing floats, and finds the -0.0 that
    # JumpReLU writes (a negative pre-activation times 0) too: those are dropped after.
    at = codes.view(-1).view(torch.int32).nonzero().squeeze(1)
    value = torch.take(codes, at)
    zero = value == 0
    if zero.any():
        kept = (~zero).nonzero().squeeze(1)
        at, value = at[kept], value[kept]
    token = at // d_sae
    return token, at - token * d_sae, value


def _first_peak(token: torch.Tensor, latent: torch.Tensor, value: torch.Tensor, best: torch.Tensor,
                per_image: int) -> torch.Tensor:
    """Per image and latent [images, d_sae], the first of the image's ``per_image`` tokens where
    the latent reaches ``best`` (its maximum there), 0 where it never fires: the index that
    ``max(dim=1)`` returns, found among the nonzero codes (:func:`_nonzero`) since on CPU that
    reduction is several times slower than ``amax``."""
    d_sae = best.shape[1]
    cell = token // per_image * d_sae + latent
    peak = (value == best.view(-1)[cell]).nonzero().squeeze(1)
    first = torch.zeros(best.numel(), dtype=torch.int64, device=best.device)
    return first.scatter_reduce_(0, cell[peak], (token % per_image)[peak], "amin", include_self=False).view_as(best)


@torch.no_grad()
def _run_part(p: _Pass, cfg: AnalyzeConfig, part: int, parts: int) -> PassState:
    """Analyse the shards of one part (or load them, if a previous run published them)."""
    from safetensors.torch import load, save

    state = p.new_state()
    key = p.part_key(part, parts)
    if p.store.exists(key):  # a killed or earlier run finished this part
        state.load(load(p.store.get_bytes(key)))
        return state
    m, record, sae = p.aset.manifest, p.record, p.sae
    device = p.device
    d_sae = sae.cfg.d_sae
    shards = [m.shards[i] for i in p.part_shards(part, parts)]
    batch = _Batch(m, min(cfg.batch_images, max((s.n_images for s in shards), default=0)),
                   m.layout.token_indices(record.tokens), d_sae, device)
    with tqdm(total=sum(s.n_images for s in shards), unit="img", disable=not cfg.progress,
              desc=f"analyze {record.sae_id[:8]}" + (f" part {part + 1}/{parts}" if parts > 1 else "")) as bar:
        for shard in shards:
            arr = p.aset.shard_array(shard, record.layer)
            shard_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
            for lo in range(0, shard.n_images, cfg.batch_images):
                hi = min(lo + cfg.batch_images, shard.n_images)
                n = hi - lo
                batch.scan(sae, arr[lo:hi], shard_sum, p.cofire_images[shard.first_image + lo:shard.first_image + hi],
                           state.cofiring)
                stat_max, best = batch.stat_max[:n], batch.patch_max[:n]
                state.act_max = torch.maximum(state.act_max, stat_max.amax(dim=0))
                _, latent, value = batch.stat_entries
                state.histogram.add(latent, value)
                state.n_tokens += n * batch.stat_tokens
                # One score per image and view, so each image enters a latent's top-k at most
                # once; every view keeps the image's best patch, where its heatmap peaks.
                where = _first_peak(*batch.patch_entries, best, m.layout.n_patches).T.int()
                scores = {"best_patch": best, "mean": batch.mean[:n],
                          "cls": batch.cls[:n] if batch.cls is not None else None}
                images = torch.arange(shard.first_image + lo, shard.first_image + hi, device=device)[None].expand(d_sae, -1)
                for view, top in state.tops.items():
                    top.merge(scores[view].T, images, where)
                state.bands.merge(best.T, images, where)
                bar.update(n)
            state.act_sum += (shard_sum * SUM_SCALE).round().long()
    if parts > 1:
        p.store.put_bytes(key, save(state.to_tensors()))
    return state


def analyze(cfg: AnalyzeConfig) -> AnalyzeResult:
    """Analyse (or find, if already published) the SAE ``cfg.sae`` over its activation set.

    With ``cfg.parts`` > 1 and no ``cfg.finish``, only part ``cfg.part`` runs and publishes its
    partial state (a rerun finds it and skips the part); ``cfg.finish`` merges every part's
    state (running the parts still missing) and publishes the analysis. The result is the same,
    bit for bit, whatever the number of parts and the order they ran in."""
    resolved = _resolve(cfg)
    if isinstance(resolved, AnalyzeResult):
        return resolved
    p = resolved
    t0 = time.perf_counter()
    if cfg.parts > 1 and not cfg.finish:
        _run_part(p, cfg, cfg.part, cfg.parts)
        return AnalyzeResult(p.analysis_id, reused=False, published=False)
    state = _run_part(p, cfg, 0, cfg.parts)  # merging it into an empty state would change nothing
    for part in range(1, cfg.parts):
        state.merge(_run_part(p, cfg, part, cfg.parts))
    _publish(p, state)
    p.store.delete_prefix(f"{analysis_prefix(p.analysis_id)}/parts/")
    log.info("published analysis %s (%d latents over %d images, %.1fs)", p.analysis_id, p.sae.cfg.d_sae,
             len(p.aset), time.perf_counter() - t0)
    return AnalyzeResult(p.analysis_id, reused=False)


def _publish(p: _Pass, state: PassState) -> None:
    m, record = p.aset.manifest, p.record
    fires = state.histogram.fires().double()
    table = LatentTable(
        frequency=(fires / max(state.n_tokens, 1)).cpu().numpy(),
        mean_activation=(state.act_sum.double() / SUM_SCALE / fires.clamp_min(1)).cpu().numpy(),
        max_activation=state.act_max.cpu().numpy().astype(np.float32),
        top={view: top.result() for view, top in state.tops.items()},
        histogram=state.histogram.result(),
        samples=state.bands.result(),
        cofiring=CoFiringTable(*state.cofiring.result()),
    )
    manifest = AnalysisManifest(
        analysis_id=p.analysis_id, sae_id=record.sae_id, activation_set_id=m.set_id, layer=record.layer,
        top_images=p.top_images, d_sae=p.sae.cfg.d_sae, n_images=len(p.aset), n_tokens=state.n_tokens,
        tokens=list(record.tokens), created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        views=p.views, default_view=default_view(record.tokens),
        histogram_log10_edges=ACTIVATION_LOG10_EDGES.tolist(), sample_log10_edges=SAMPLE_LOG10_EDGES.tolist(),
        cofiring_tokens=int(p.cofire_images.sum()) * p.stat_tokens,
    )
    save_analysis(p.store, manifest, table)
