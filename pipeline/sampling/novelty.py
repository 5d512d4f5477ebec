"""novelty: forward a turn unlike the last `lruSize` forwarded turns of the same site.

The reference compares the token set of the last 8 messages with each of its last 200 shipped
sets by exact Jaccard and forwards when 1 - max Jaccard >= 0.7. Here each set is a MinHash
signature; a MinHashLSH index over the window finds the entries that could be that similar and
their estimated Jaccard decides. The window holds signatures only, so every sampler replica
rebuilds the same one from the `sampler.shipped` records (`apply_shipped`) in topic order.

Banding: "not novel" means Jaccard > 0.3, not far above the 0.05-0.15 two unrelated prose
sessions share through common words. Bands that catch 0.3 reliably (r=2) also return a third
of a large window as candidates, so the default banding depends on the window size: windows
up to RECALL_FIRST_MAX_SIZE use r=2 (recall first; candidates are cheap to check), larger ones
r=3 (a few % of the window as candidates, at the price of misses between 0.3 and ~0.4).
bench/novelty.py measures both, tests/unit/sampling/test_novelty_accuracy.py the agreement.

The index is datasketch's MinHashLSH (banding, insert, remove) with two changes that matter
at large windows, both checked against MinHashLSH.query by the tests: a bucket storage that
holds a bare key until a bucket has two (its dict storage keeps a 216-byte set per bucket,
and nearly every bucket holds one key: 12 KB per entry instead of 5 KB), and a candidate
lookup that reads the buckets with set.update instead of adding keys one by one in Python.
Scoring thousands of candidates (a large window, an unrelated query) compares the low byte of
each signature value first, which bounds a candidate's match count from above, and compares
full values only where that bound can still reach the best (`_bounded`; same answer, tested).
The window keeps the low bytes as bit planes (`_low_planes`), so 64 columns are compared per
XOR and counted per popcount. At 100 000 entries a few dozen buckets hold thousands of rows
each (sessions whose minimum in a band is the same common word); such a bucket keeps its rows
in a numpy array (`_Rows`), so a query reads them as they are instead of copying them through
a Python set, and the largest also keep a copy of planes 0-4 of their rows, from which a
query with many candidates bounds them by equal low 5 bits first (`_bounded_buckets`),
reading contiguous blocks instead of a cache line per row. None of this changes which rows are
candidates nor the answer, so signatures, shipped records and decisions are what they were
(tests/unit/sampling/test_novelty_bounds.py).

The window fills and empties the buckets itself (MinHashLSH's banding, with the band keys cut
from one byteswap of the signature; MinHashLSH.insert/remove are not called). A window of at
most SCAN_MAX_SIZE entries (the default 200 among them) is scored without reading them: its
whole signature array is compared with the query at once, and the rows sharing every value of
some band are exactly the rows sharing a bucket (`_scan`; tests/unit/sampling/test_novelty_scan.py),
so such a window keeps no buckets at all unless asked to (`buckets=True`, for the tests that
compare them with MinHashLSH).
"""

from __future__ import annotations

import array
import functools
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np
from datasketch import MinHash, MinHashLSH
from datasketch.storage import UnorderedStorage

from pipeline.errors import RecordError
from pipeline.sampling.base import Decision

DEFAULT_NUM_PERM = 128
# datasketch's own default seed, so MinHash(num_perm=128).update_batch(tokens) reproduces a
# shipped signature anywhere. Changing it (or num_perm) makes old shipped records unusable.
DEFAULT_SEED = 1
SCHEME = "affine32"  # datasketch 2.x default; the shipped record has no field for it
DEFAULT_THRESHOLD = 0.7
DEFAULT_WINDOW = 200
TOKEN_MESSAGES = 8
RECALL_FIRST_MAX_SIZE = 2048
# Candidate counts above which scoring first bounds each candidate by its signature's low bytes:
# a large window returns thousands of candidates for an unrelated query.
PREFILTER_MIN_CANDIDATES = 256
# `_bounded_buckets` compares in full up to PEEK_CANDIDATES of the candidates whose bound is
# within PEEK_SLACK of the best, to learn a match count the others must reach. On the bench's
# 100 000-entry window (the 60 queries with the most candidates, ~13 000 each) that left 96 on
# average (at most 519) to the byte bound, against 74 knowing the best match, 475 peeking at the
# best bound alone, 187 / 207 with a slack of 1 / 6; np.argpartition for the 16 best bounds left
# 94 and cost ~0.07 ms.
PEEK_CANDIDATES = 32
PEEK_SLACK = 3
# A bucket holding this many rows keeps them in a numpy array (_Rows) rather than a set.
ARRAY_BUCKET_MIN = 64
# A bucket holding this many rows also keeps a copy of its rows' low 5 bits (`_Rows.planes`),
# and a query whose buckets with copies hold at least BOUND_BUCKETS_MIN rows bounds those rows
# from the copies first (`NoveltyWindow._bounded_buckets`); below that the byte bound alone
# (`_bounded`, gathering each row) cost as little or less. On the bench's 100 000-entry window,
# CPU ms per query with cold caches, byte bound alone against copies first, by rows in copied
# buckets: 0.39 / 0.46 at 500-1 500, 0.34 / 0.33 at 1 500-3 000, 0.44 / 0.41 at 3 000-5 000,
# 0.68 / 0.50 at 5 000-8 000, 0.86 / 0.58 at 8 000-20 000. The copies of the buckets of at
# least 512 rows take 14 MiB there (80 bytes a row), of every array bucket 36 MiB.
PLANES_BUCKET_MIN = 512
BOUND_BUCKETS_MIN = 1500
BEST_IN_PYTHON_MAX = 32  # `_best` picks among at most this many rows with Python lists
# A window of at most this many entries scores a query by comparing its bands with every row
# (`_scan`: numpy over the whole signature array) instead of reading the LSH buckets: the same
# candidates, found in ~0.05 ms at 200 entries, where the bucket lookup cost more.
SCAN_MAX_SIZE = 2048
_MAX32 = 0xFFFFFFFF
# fmix32's shifts and multipliers as uint32 scalars, made once rather than per signature
_U16, _U13 = np.uint32(16), np.uint32(13)
_FMIX_1, _FMIX_2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_BYTE_LANES = np.uint64(0x0101010101010101)
_LOW_PLANES = 8  # the low byte's bits, one plane each (`_low_planes`)
# planes 0-4, the low 5 bits: what the largest buckets keep a copy of. On the 40 queries with the
# most candidates at 100 000 entries (~13 000 each) equal low 3 / 4 / 5 / 6 bits left 7 800 /
# 1 200 / 93 / 16 candidates to the byte bound: 5 planes read 80 bytes a row and leave little
_COPIED_PLANES = 5
_INTP_CODE = "q" if np.dtype(np.intp).itemsize == 8 else "i"  # array.array's code for np.intp


def session_tokens(messages: Sequence[Mapping[str, Any]],
                   last: int = TOKEN_MESSAGES) -> frozenset[str]:
    """Lower-cased whitespace-split words of the text parts of the last `last` messages.

    The text parts are those the trace shows (`pipeline.model.trace.visible_text`), so the tokens
    can be recomputed from a sampled trace's messages and agree."""
    texts: list[str] = []
    for message in messages[max(0, len(messages) - last):]:
        for part in message.get("parts") or []:
            # visible_text(part), inlined
            if part.get("type") != "text" or part.get("synthetic") or part.get("ignored"):
                continue
            text = part.get("text")
            if isinstance(text, str) and text:
                texts.append(text)
    # one lower() and split() over the texts joined by a space: the same words as text by text
    # (a space ends a word, and lower()'s only context rule, a final sigma, stops at a space)
    return frozenset(" ".join(texts).lower().split())


class _TokenHashes:
    """sha1_hash32 of each token, remembered: common words recur in every session and sha1 per
    token is most of a signature's cost. Two generations: when the young one is full it becomes
    the old one, and a token found only in the old one moves back, so common words stay while
    one-off identifiers age out (clearing everything at once made every decision after it hash
    its common words again). Long blobs are not kept."""

    def __init__(self, generation: int = 1 << 17) -> None:
        self.generation = generation
        self.young: dict[str, int] = {}
        self.old: dict[str, int] = {}

    def __call__(self, tokens: Collection[str]) -> np.ndarray:
        listed = tokens if type(tokens) is list else list(tokens)
        n = len(listed)
        # one C-level pass over the young generation, which holds most of a session's tokens,
        # straight into an array (-1: not there); the misses are then handled as a batch
        values = np.fromiter(map(self.young.get, listed, repeat(-1, n)), dtype=np.int64, count=n)
        at = (values < 0).nonzero()[0]
        if len(at):
            missing = [listed[i] for i in at.tolist()]
            found = list(map(self.old.get, missing))
            if None in found:
                # datasketch's sha1_hash32, inlined; surrogatepass: a lone surrogate can arrive
                # in JSON and must hash, not raise
                found = [_sha1_low32(_sha1(token.encode("utf-8", "surrogatepass")).digest())[0]
                         if value is None else value for token, value in zip(missing, found, strict=True)]
            self._keep(missing, found)
            values[at] = found
        return values.astype(np.uint32)

    def _keep(self, tokens: list[str], values: list[int]) -> None:
        young = self.young
        if len(young) + len(tokens) < self.generation:
            young.update([(token, value) for token, value in zip(tokens, values, strict=True) if len(token) <= 64])
            return
        for token, value in zip(tokens, values, strict=True):
            if len(token) <= 64:
                if len(young) >= self.generation:
                    self.old, self.young = young, {}
                    young = self.young
                young[token] = value


_sha1 = hashlib.sha1
_sha1_low32 = struct.Struct("<I").unpack_from  # the digest's first 4 bytes, little-endian
_token_hashes = _TokenHashes()


class MinHasher:
    """datasketch's MinHash (affine32 scheme, sha1_hash32 of UTF-8 tokens) in one numpy pass,
    instead of a MinHash.update_batch per set; same hash values, tested."""

    def __init__(self, num_perm: int = DEFAULT_NUM_PERM, seed: int = DEFAULT_SEED) -> None:
        if not isinstance(num_perm, int) or num_perm < 16:
            raise ValueError(f"num_perm must be an integer >= 16, got {num_perm!r}")
        self.num_perm, self.seed = num_perm, seed
        self.permutations = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations
        self._a = self.permutations[0].astype(np.uint32)
        self._b = self.permutations[1].astype(np.uint32)
        self._b_column = self._b[:, None].copy()

    def hashvalues(self, tokens: Collection[str]) -> np.ndarray | None:
        """The signature as uint32[num_perm], or None for an empty set."""
        if not tokens:
            return None
        hv = _token_hashes(tokens)
        # MurmurHash3 fmix32, as datasketch applies before the affine permutations.
        hv ^= hv >> _U16
        hv *= _FMIX_1
        hv ^= hv >> _U13
        hv *= _FMIX_2
        hv ^= hv >> _U16
        # a * hv + b mod 2**32 for every (permutation, token), added in place: the same uint32
        # values as `hv[:, None] * a + b` without a second tokens x num_perm array. A row per
        # permutation, so the minimum runs along contiguous memory (~33 against ~57 us for 300
        # tokens taking it across rows of tokens)
        permuted = np.multiply.outer(self._a, hv)
        permuted += self._b_column
        return np.minimum.reduce(permuted, axis=1)

    def minhash(self, hashvalues: np.ndarray) -> MinHash:
        return MinHash(seed=self.seed, hashvalues=hashvalues, permutations=self.permutations,
                       scheme=SCHEME)

    def probe(self) -> MinHash:
        """A MinHash whose `hashvalues` the caller overwrites before each LSH insert or query:
        the index reads the values and keeps nothing of the object, and building a MinHash
        per call costs as much as the query."""
        return self.minhash(np.zeros(self.num_perm, dtype=np.uint32))


LSH_JACCARD_MIN, LSH_JACCARD_MAX = 0.05, 0.9


@functools.cache
def default_lsh_params(size: int, num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) from datasketch's optimiser for Jaccard 1 - threshold; see the module doc."""
    weights = (0.01, 0.99) if size <= RECALL_FIRST_MAX_SIZE else (0.3, 0.7)
    # datasketch's optimiser needs a Jaccard strictly inside (0, 1) and finds no banding near the
    # ends (noveltyThreshold 0 or 1 raised in every decision); the bands only pick candidates,
    # which are then scored by estimated Jaccard, so a clamped target keeps the answers
    jaccard = min(max(1.0 - threshold, LSH_JACCARD_MIN), LSH_JACCARD_MAX)
    lsh = MinHashLSH(threshold=jaccard, num_perm=num_perm, weights=weights)
    return lsh.b, lsh.r


Signature = MinHash | np.ndarray | Sequence[int] | None


@functools.cache
def _plane_order(words: int) -> np.ndarray:
    """Where `_low_planes` reads each of its bits in np.unpackbits(low, bitorder="little") (bit p
    of column c at 8c + p): bit j of word w * 8 + p is bit p of column 64w + j."""
    w, p, j = np.ogrid[:words, :_LOW_PLANES, :64]
    return ((64 * w + j) * _LOW_PLANES + p).reshape(-1)


def _low_planes(low: np.ndarray) -> np.ndarray:
    """The bits of low bytes, plane by plane: `low` (64 * W,) uint8 -> (W * 8,) uint64, where
    word w * 8 + p holds bit p of columns 64w .. 64w + 63 (column 64w + j at bit j). Two values'
    low bytes are equal where all 8 planes agree, and their low k bits where planes 0..k-1 do:
    XOR, OR across planes and a popcount count the columns that differ, 64 of them per
    operation instead of one byte each."""
    bits = np.unpackbits(low, bitorder="little").take(_plane_order(len(low) // 64))
    return np.packbits(bits, bitorder="little").view(np.uint64)


def _add_words(bits: list[np.ndarray]) -> np.ndarray:
    """The sum of per-word popcounts (uint8 arrays, one per word of a row): the row's count of
    columns, at most 64 per word, so a byte holds it up to 3 words and two bytes beyond."""
    if len(bits) == 1:
        return bits[0]
    total = np.add(bits[0], bits[1], dtype=np.uint8 if len(bits) <= 3 else np.uint16)
    for more in bits[2:]:
        total += more
    return total


def _aligned(rows: int, columns: int) -> np.ndarray:
    """Zeroed uint64 (rows, columns) starting on a 64-byte boundary, so that a row of 16 words
    (128 values) is two cache lines, not three."""
    buffer = np.zeros(rows * columns * 8 + 64, dtype=np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + rows * columns * 8].view(np.uint64).reshape(rows, columns)


class _Rows:
    """A large bucket's rows: the first `n` entries of an array a query reads as a numpy array
    without copying (`view`), and each row's place in it, so a row is added or removed in O(1)
    (the last takes its place). The order depends on the history of the bucket; nothing that
    reads it depends on the order. The storage is an `array.array` of machine integers: setting
    and reading one item from Python costs a fraction of a numpy scalar access.

    Given `source` (the window's `_planes` as (rows, W, 8) cut to planes 0-4), a bucket that
    reaches PLANES_BUCKET_MIN rows also keeps a copy of those planes of its rows, word by word
    (`planes`: word w of plane p of row i at [w, p, i]), and keeps it from then on: a query bounds
    every row of the bucket from that contiguous block, with no gather of a cache line per row
    from the window (`NoveltyWindow._bounded_buckets`)."""

    __slots__ = ("array", "at", "n", "planes", "source")

    def __init__(self, rows: Iterable[int], source: np.ndarray | None = None) -> None:
        ordered = sorted(rows)
        self.n = len(ordered)
        self.array = array.array(_INTP_CODE, ordered)
        self.array.extend([0] * max(self.n, 16 - self.n))  # room for as many again (16 at least)
        self.at = {row: i for i, row in enumerate(ordered)}
        self.source = source
        self.planes: np.ndarray | None = None
        if source is not None and self.n >= PLANES_BUCKET_MIN:
            self._copy_planes()

    def _copy_planes(self) -> None:
        source = self.source
        assert source is not None
        self.planes = np.zeros((*source.shape[1:], len(self.array)), dtype=np.uint64)
        self.planes[..., :self.n] = source[self.view()].transpose(1, 2, 0)

    def add(self, row: int) -> None:
        at = self.at
        if row in at:
            return
        n = self.n
        if n == len(self.array):
            # a new array, not a resize: a numpy view of the old one may still be alive
            self.array = self.array + array.array(_INTP_CODE, [0] * n)
            if self.planes is not None:
                self.planes = np.concatenate([self.planes, np.zeros_like(self.planes)], axis=2)
        self.array[n] = row
        at[row] = n
        self.n = n + 1
        if self.planes is not None:
            self.planes[..., n] = self.source[row]  # type: ignore[index]
        elif self.source is not None and self.n >= PLANES_BUCKET_MIN:
            self._copy_planes()

    def discard(self, row: int) -> None:
        i = self.at.pop(row, None)
        if i is None:
            return
        n = self.n = self.n - 1
        if i != n:
            last = self.array[n]
            self.array[i] = last
            self.at[last] = i
            if self.planes is not None:
                self.planes[..., i] = self.planes[..., n]

    def view(self) -> np.ndarray:
        return np.frombuffer(self.array, dtype=np.intp, count=self.n)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(self.at)

    def __contains__(self, row: object) -> bool:
        return row in self.at


class _Buckets(UnorderedStorage):
    """One LSH band: band key -> a window row, a set of rows once two share the bucket, and a
    _Rows once ARRAY_BUCKET_MIN do."""

    def __init__(self) -> None:
        self.map: dict[bytes, int | set[int] | _Rows] = {}

    def keys(self) -> Any:
        return self.map.keys()

    def get(self, key: bytes) -> Collection[int]:
        rows = self.map.get(key)
        return () if rows is None else (rows,) if type(rows) is int else rows

    def insert(self, key: bytes, *vals: int, **kwargs: Any) -> None:
        for val in vals:
            rows = self.map.get(key)
            if rows is None:
                self.map[key] = val
            elif type(rows) is int:
                if rows != val:
                    self.map[key] = {rows, val}
            else:
                rows.add(val)
                if type(rows) is set and len(rows) >= ARRAY_BUCKET_MIN:
                    self.map[key] = _Rows(rows)

    def remove(self, *keys: bytes, **kwargs: Any) -> None:
        for key in keys:
            self.map.pop(key, None)

    def remove_val(self, key: bytes, val: int, **kwargs: Any) -> None:
        rows = self.map.get(key)
        if type(rows) is int:
            if rows == val:
                del self.map[key]
        elif rows is not None:
            rows.discard(val)
            if len(rows) == 1:
                self.map[key] = next(iter(rows))

    def size(self) -> int:
        return len(self.map)

    def itemcounts(self, **kwargs: Any) -> dict[bytes, int]:
        return {k: 1 if type(v) is int else len(v) for k, v in self.map.items()}

    def has_key(self, key: bytes) -> bool:
        return key in self.map


def _check(size: int, threshold: float) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"window size (lruSize) must be a positive integer, got {size!r}")
    if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"noveltyThreshold must be a number within [0, 1], got {threshold!r}")


class NoveltyWindow:
    """The last `size` forwarded signatures of one site, oldest evicted first.

    Entries are keyed by snapshot id and ordered by arrival; adding a key already present
    changes nothing, and scoring changes nothing, so replicas fed the same records in the
    same order hold the same window and score alike.
    """

    def __init__(self, site_key: str, size: int = DEFAULT_WINDOW,
                 num_perm: int = DEFAULT_NUM_PERM, *, seed: int = DEFAULT_SEED,
                 threshold: float = DEFAULT_THRESHOLD, lsh_params: tuple[int, int] | None = None,
                 hasher: MinHasher | None = None, buckets: bool | None = None) -> None:
        """`buckets`: keep the LSH buckets (`_index`, read by `_candidate_rows`). None: only a
        window too large to scan (above SCAN_MAX_SIZE) keeps them, since a scanned one is scored
        without reading them; True for what reads them itself (tests against MinHashLSH)."""
        _check(size, threshold)
        self.hasher = hasher or MinHasher(num_perm, seed)
        if (self.hasher.num_perm, self.hasher.seed) != (num_perm, seed):
            raise ValueError("hasher num_perm/seed differ from the window's")
        self.site_key, self.size, self.num_perm, self.seed = site_key, size, num_perm, seed
        self.threshold = threshold
        self.lsh_params = lsh_params or default_lsh_params(size, num_perm, threshold)
        # LSH keys are row numbers of _sig, so candidates index the signatures directly.
        self._lsh = MinHashLSH(num_perm=num_perm, params=self.lsh_params)
        self._buckets = [_Buckets() for _ in range(self._lsh.b)]
        self._lsh.hashtables = self._buckets  # type: ignore[assignment]
        self._maps = [buckets.map for buckets in self._buckets]
        # filling and emptying 59 buckets per entry was a tenth of a forwarded turn's cost
        self.keeps_buckets = size > SCAN_MAX_SIZE if buckets is None else buckets
        # each indexed row's band keys (what MinHashLSH.insert would compute), to remove it
        self._band_keys: list[list[bytes] | None] = [None] * size
        self._bytes_ranges = [(4 * start, 4 * end) for start, end in self._lsh.hashranges]
        self._slots: OrderedDict[str, int] = OrderedDict()
        self._keys: list[str | None] = [None] * size
        self._sig = np.zeros((size, num_perm), dtype=np.uint32)
        # with two values a band (r=2, the default up to RECALL_FIRST_MAX_SIZE) band k is 64-bit
        # word k of a row: one comparison of words says which bands are equal (`_sharing`)
        self._sig_words = self._sig.view(np.uint64) if self._lsh.r == 2 and num_perm % 2 == 0 else None
        # a row's equal values counted as bytes summed eight to a word (`_count_equal`): exact
        # while the count fits a byte
        self._count_by_words = num_perm % 8 == 0 and num_perm < 256
        # each value's low byte as 8 bit planes (`_low_planes`; read by `_bounded`, and planes
        # 0-4 through the large buckets' copies by `_bounded_buckets`), columns past num_perm
        # zero; `_row_low` holds the padded low bytes of the row being added
        self._words = -(-num_perm // 64)
        self._planes = _aligned(size, self._words * _LOW_PLANES)
        self._copied_planes = self._planes.reshape(size, self._words, _LOW_PLANES)[:, :, :_COPIED_PLANES]
        self._row_low = np.zeros(64 * self._words, dtype=np.uint8)
        self._query_low = np.ones(64 * self._words, dtype=np.uint8)  # `_query_planes`' padding 1
        # `_bounded_buckets`' working arrays (a bucket's XOR with the query; the columns that
        # differ, per candidate), kept between queries
        self._scratch = np.zeros((self._words, _COPIED_PLANES, 0), dtype=np.uint64)
        self._unequal = np.zeros((self._words, 0), dtype=np.uint64)
        self._seq = np.zeros(size, dtype=np.int64)
        self._indexed = np.zeros(size, dtype=bool)
        self._indexed_count = 0
        self._free = list(range(size - 1, -1, -1))
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def keys(self) -> list[str]:
        """Oldest first."""
        return list(self._slots)

    def score(self, tokens: Collection[str],
              exclude: str | None = None) -> tuple[float, str | None]:
        """(novelty, closest entry's key or None). `exclude`: a key to leave out, so a
        replayed snapshot is not compared with its own earlier shipment."""
        return self.score_hashvalues(self.hasher.hashvalues(tokens), exclude)

    def score_hashvalues(self, hv: np.ndarray | None, exclude: str | None = None
                         ) -> tuple[float, str | None]:
        # An empty set or an empty window is novel, as in the reference. So is a set with no
        # LSH candidate: nothing in the window is near enough to matter.
        if hv is None or not self._indexed_count:
            return 1.0, None
        skip = self._slots.get(exclude) if exclude is not None else None
        if not self.keeps_buckets or self.size <= SCAN_MAX_SIZE:
            return self._scan(hv, skip)
        found, large = self._lookup(hv)
        if skip is not None:
            found.discard(skip)
        rows = np.fromiter(found, dtype=np.intp, count=len(found))
        # a row in several buckets is read once per bucket: that changes no match count and
        # so no answer, and costs less than leaving each row once
        copied = [bucket for bucket in large if bucket.planes is not None]
        if sum(bucket.n for bucket in copied) >= BOUND_BUCKETS_MIN:
            large = [bucket for bucket in large if bucket.planes is None]
        else:
            copied = []
        if large:
            rows = np.concatenate([rows, *(bucket.view() for bucket in large)])
            if skip is not None:
                rows = rows[rows != skip]
        if copied or len(rows) > PREFILTER_MIN_CANDIDATES:
            q = self._query_planes(hv)
            reached = 0
            if copied:
                kept, reached = self._bounded_buckets(copied, q, hv, skip)
                rows = np.concatenate([rows, kept])
            if not len(rows):
                return 1.0, None
            rows = self._bounded(rows, hv, q, reached)
        elif not len(rows):
            return 1.0, None
        matches = np.add.reduce(self._sig.take(rows, axis=0) == hv, axis=1)
        return self._best(rows, matches)

    def _best(self, rows: np.ndarray, matches: np.ndarray) -> tuple[float, str | None]:
        # Ties go to the newest entry, whatever order the LSH returned candidates in.
        if len(rows) <= BEST_IN_PYTHON_MAX:
            # the few rows the bounds leave: Python lists cost less than numpy's first calls of
            # a decision (with cold caches ~22 against ~50 us for 5 rows)
            counts = matches.tolist()
            best = max(counts)
            seq = self._seq
            row = max((int(seq[r]), r) for r, m in zip(rows.tolist(), counts, strict=True) if m == best)[1]
        else:
            best = int(matches.max())
            tied = rows[matches == best]
            row = int(tied[np.argmax(self._seq[tied])])
        return (self.num_perm - best) / self.num_perm, self._keys[row]

    def _scan(self, hv: np.ndarray, skip: int | None) -> tuple[float, str | None]:
        """score_hashvalues for a small window, without the buckets: the candidates are the
        indexed rows that share a band with `hv` (all `r` values of the band equal: what makes
        MinHashLSH's band keys equal), compared with every row at once, then scored as the
        bucket path scores them (same rows, same answer; tests/unit/sampling/test_novelty_scan.py)."""
        equal = self._sig == hv
        found = self._sharing(hv, equal)
        if skip is not None:
            found[skip] = False
        rows = np.flatnonzero(found)
        if not len(rows):
            return 1.0, None
        # similar sessions share a band with every row: then no copy of the rows is needed
        return self._best(rows, self._count_equal(equal if len(rows) == self.size else equal[rows]))

    def _sharing(self, hv: np.ndarray, equal: np.ndarray) -> np.ndarray:
        """The indexed rows sharing all `r` values of some band with `hv` (`equal`: `_sig == hv`),
        as a mask: the rows MinHashLSH.query would return."""
        b, r = self._lsh.b, self._lsh.r
        if self._sig_words is not None:
            words = np.ascontiguousarray(hv, dtype=np.uint32).view(np.uint64)
            found = (self._sig_words == words)[:, :b].any(axis=1)
        else:
            shared = equal[:, 0:b * r:r]
            for k in range(1, r):
                shared = shared & equal[:, k:b * r:r]
            found = shared.any(axis=1)
        found &= self._indexed
        return found

    def _count_equal(self, equal: np.ndarray) -> np.ndarray:
        """`np.count_nonzero(equal, axis=1)` of a C-ordered bool array with `num_perm` columns:
        its bytes (0 or 1) summed eight to a 64-bit word, column word by column word (no byte
        lane passes 255), and a word's eight lanes added by one multiplication, whose top byte is
        their sum while that fits a byte (tests/unit/sampling/test_novelty_scan.py)."""
        if not self._count_by_words:
            return np.count_nonzero(equal, axis=1)
        lanes = np.ascontiguousarray(equal).view(np.uint64).sum(axis=1, dtype=np.uint64)
        return ((lanes * _BYTE_LANES) >> np.uint64(56)).astype(np.intp)

    def _query_planes(self, hv: np.ndarray) -> np.ndarray:
        """`hv`'s low bytes as `_low_planes`, the padding columns 1 (rows have 0 there: never equal)."""
        self._query_low[:self.num_perm] = hv  # a cast to uint8 keeps the low byte
        return _low_planes(self._query_low)

    def _bounded(self, rows: np.ndarray, hv: np.ndarray, q: np.ndarray | None = None,
                 reached: int = 0) -> np.ndarray:
        """The rows among `rows` that can match `hv` best or tie the best, given that some
        candidate matches `reached` values: equal values have equal low bytes, so a row's count
        of equal low bytes bounds its count of equal values from above, and a row bounded below
        some row's count cannot be the best. Reading a quarter of the bytes for every candidate
        and all of them for a few gives the same answer as comparing every candidate in full
        (tested). `q`: `_query_planes(hv)`."""
        if q is None:
            q = self._query_planes(hv)
        words = self._words
        differ = self._planes.take(rows, axis=0)
        differ ^= q
        # a column differs where any of its word's 8 planes does: the planes of a word are
        # adjacent, so OR-ing neighbours three times over the flat array (one long strided
        # operation each; along a row's 16 words numpy would loop once per row) leaves one
        # word of differing columns per row and word
        flat = differ.reshape(-1)
        for _ in range(3):
            flat = flat[0::2] | flat[1::2]
        bits = np.bitwise_count(flat)
        count = _add_words([bits[w::words] for w in range(words)])  # columns that differ
        best = int(count.argmin())
        reached = max(reached, int(np.count_nonzero(self._sig[rows[best]] == hv)))
        return rows[count <= 64 * words - reached]

    def _bounded_buckets(self, buckets: list[_Rows], q: np.ndarray, hv: np.ndarray,
                         skip: int | None) -> tuple[np.ndarray, int]:
        """The rows of large `buckets` that can match `hv` best or tie the best, and a match
        count some candidate reaches: each row is bounded by its count of equal low 5 bits
        (above the count of equal low bytes, so above the count of equal values), read from
        the bucket's own copy of its rows' planes 0-4: contiguous blocks, where gathering
        them from the window's rows cost a cache line a row and most of a worst query's time
        (~13 000 candidates at 100 000 entries). A few rows with the best bounds (PEEK_CANDIDATES)
        are compared in full for that count, and rows whose bound is below it are dropped. A
        row in several buckets is bounded once per bucket, with the same bound; the caller
        bounds what is left by low bytes (`_bounded`) and compares the rest in full."""
        words = self._words
        total = sum(rows.n for rows in buckets)
        widest = max(rows.n for rows in buckets)
        if self._scratch.shape[2] < widest:
            self._scratch = np.zeros((words, _COPIED_PLANES, widest), dtype=np.uint64)
        if self._unequal.shape[1] < total:
            self._unequal = np.zeros((words, total), dtype=np.uint64)
        q_copied = q.reshape(words, _LOW_PLANES)[:, :_COPIED_PLANES, None]
        # per bucket: XOR with the query into one reused array (no larger than the largest
        # bucket, so it stays in cache) and OR over the planes, each a contiguous run of the
        # bucket's rows: a column differs where any of its copied planes does. Two calls a
        # bucket; XOR-ing every bucket into one array first wrote and read back ~1 MB more for
        # a worst query (13 000 rows) and cost ~10 % more.
        unequal = self._unequal[:, :total]
        start = 0
        for rows in buckets:
            n = rows.n
            differ = np.bitwise_xor(rows.planes[..., :n], q_copied,  # type: ignore[index]
                                    out=self._scratch[..., :n])
            np.bitwise_or.reduce(differ, axis=1, out=unequal[:, start:start + n])
            start += n
        bits = np.bitwise_count(unequal)
        count = _add_words(list(bits))  # columns whose low 5 bits differ
        candidates = np.concatenate([rows.view() for rows in buckets])
        if skip is not None:
            keep = candidates != skip
            candidates, count = candidates[keep], count[keep]
        if not len(candidates):
            return candidates, 0
        near_best = (count <= int(np.minimum.reduce(count)) + PEEK_SLACK).nonzero()[0]
        equal = self._sig.take(candidates[near_best[:PEEK_CANDIDATES]], axis=0) == hv
        reached = int(np.maximum.reduce(np.add.reduce(equal, axis=1)))
        return candidates[count <= 64 * words - reached], reached

    def _lookup(self, hv: np.ndarray) -> tuple[set[int], list[_Rows]]:
        """The rows of the buckets `hv` falls in: those of small buckets as a set, and the large
        buckets (`_Rows`) as they are. A row may be in several."""
        raw = hv.astype(np.uint32, copy=False).byteswap().tobytes()
        found: set[int] = set()
        large: list[_Rows] = []
        for (start, end), rows_of in zip(self._bytes_ranges, self._maps, strict=True):
            rows = rows_of.get(raw[start:end])
            if rows is None:
                continue
            if type(rows) is int:
                found.add(rows)
            elif type(rows) is set:
                found.update(rows)
            else:
                large.append(rows)  # type: ignore[arg-type]
        return found, large

    def _candidate_rows(self, hv: np.ndarray) -> np.ndarray:
        """The rows of `candidates(hv)` as an array, each once; large buckets are read as arrays."""
        if not self.keeps_buckets:
            return np.flatnonzero(self._sharing(hv, self._sig == hv))
        found, large = self._lookup(hv)
        small = np.fromiter(found, dtype=np.intp, count=len(found))
        if not large:
            return small
        # a row may sit in several buckets: marking rows in a window-sized mask leaves each once
        seen = np.zeros(self.size, dtype=bool)
        seen[small] = True
        for rows in large:
            seen[rows.view()] = True
        return np.flatnonzero(seen)

    def candidates(self, hv: np.ndarray) -> set[int]:
        """The rows MinHashLSH.query would return: those sharing a band with `hv`."""
        if not self.keeps_buckets:
            return set(np.flatnonzero(self._sharing(hv, self._sig == hv)).tolist())
        # A band's key is its values as big-endian bytes (datasketch's _byteswap), so one
        # byteswap of the whole signature gives every band's key by slicing.
        raw = hv.astype(np.uint32, copy=False).byteswap().tobytes()
        found: set[int] = set()
        for (start, end), buckets in zip(self._lsh.hashranges, self._buckets, strict=True):
            rows = buckets.map.get(raw[4 * start:4 * end])
            if rows is None:
                continue
            if type(rows) is int:
                found.add(rows)
            else:
                found.update(rows)
        return found

    def add(self, key: str, signature: Signature) -> bool:
        """Append `key` (None or an empty MinHash: an empty token set). False if present."""
        if key in self._slots:
            return False
        hv = self._hashvalues(signature)
        if len(self._slots) >= self.size:
            _, old = self._slots.popitem(last=False)
            if self._indexed[old]:
                if self.keeps_buckets:
                    self._unindex(old)
                self._indexed[old] = False
                self._indexed_count -= 1
            self._keys[old] = None
            self._free.append(old)
        row = self._free.pop()
        self._slots[key] = row
        self._keys[row] = key
        self._arrivals += 1
        self._seq[row] = self._arrivals
        if hv is not None:
            self._sig[row] = hv
            self._row_low[:self.num_perm] = hv  # a cast to uint8 keeps the low byte
            self._planes[row] = _low_planes(self._row_low)
            if self.keeps_buckets:
                self._index(row, hv)
            self._indexed[row] = True
            self._indexed_count += 1
        return True

    def _index(self, row: int, hv: np.ndarray) -> None:
        """MinHashLSH.insert(row) into the buckets (`_Buckets.insert`, inlined): the band keys are
        sliced from one byteswap of the signature, as `_candidate_rows` reads them, and kept for
        `_unindex`. MinHashLSH's own key store is not kept: nothing here reads it."""
        raw = hv.astype(np.uint32, copy=False).byteswap().tobytes()
        keys = [raw[start:end] for start, end in self._bytes_ranges]
        self._band_keys[row] = keys
        array_min = ARRAY_BUCKET_MIN
        for rows_of, key in zip(self._maps, keys, strict=True):
            rows = rows_of.get(key)
            if rows is None:
                rows_of[key] = row
            elif type(rows) is int:
                if rows != row:
                    rows_of[key] = {rows, row}
            else:
                rows.add(row)
                if type(rows) is set and len(rows) >= array_min:
                    rows_of[key] = _Rows(rows, self._copied_planes)

    def _unindex(self, row: int) -> None:
        """MinHashLSH.remove(row) (`_Buckets.remove_val`, inlined): a bucket left with one row
        holds it bare, an emptied one leaves the band."""
        keys = self._band_keys[row]
        self._band_keys[row] = None
        if keys is None:
            return
        for rows_of, key in zip(self._maps, keys, strict=True):
            rows = rows_of.get(key)
            if type(rows) is int:
                if rows == row:
                    del rows_of[key]
            elif rows is not None:
                rows.discard(row)
                if len(rows) == 1:
                    rows_of[key] = next(iter(rows))

    def apply_shipped(self, record: Mapping[str, Any], signature: np.ndarray | None = None) -> bool:
        """Add a `sampler.shipped/1` record; RecordError if it cannot belong to this window.
        `signature`: the array the record's `hashvalues` were written from (a forward of this
        replica's own), taken instead of reading the 128 values back from the list."""
        if record.get("schema") != "sampler.shipped/1":
            raise RecordError("not_shipped",
                              f"expected sampler.shipped/1, got {record.get('schema')!r}")
        if record.get("site_key") != self.site_key:
            raise RecordError("shipped_site", f"record of site {record.get('site_key')!r} "
                                              f"offered to the window of {self.site_key!r}")
        if (record.get("num_perm"), record.get("seed")) != (self.num_perm, self.seed):
            raise RecordError("shipped_params", (
                f"signature made with num_perm={record.get('num_perm')} seed={record.get('seed')}; "
                f"this sampler uses num_perm={self.num_perm} seed={self.seed}"))
        try:
            if record["empty"]:
                signature = None
            elif signature is None:
                signature = record["hashvalues"]
            return self.add(record["snapshot_id"], signature)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError("shipped_invalid", str(exc)) from None

    def _hashvalues(self, signature: Signature) -> np.ndarray | None:
        if signature is None:
            return None
        if isinstance(signature, MinHash):
            made = (signature.seed, len(signature), signature.scheme)
            if made != (self.seed, self.num_perm, SCHEME):
                raise ValueError(f"MinHash must have seed={self.seed}, num_perm={self.num_perm}, "
                                 f"scheme={SCHEME}")
            return None if signature.is_empty() else signature.hashvalues.astype(np.uint32)
        if type(signature) is np.ndarray and signature.dtype == np.uint32 and signature.shape == (self.num_perm,):
            return signature.copy()  # what the checks and the cast below give: every uint32 is in range
        values = np.asarray(signature)
        if values.shape != (self.num_perm,) or values.dtype.kind not in "iu":
            raise ValueError(f"hashvalues must be {self.num_perm} integers, got shape "
                             f"{values.shape} of {values.dtype}")
        if values.min() < 0 or values.max() > _MAX32:
            raise ValueError("hashvalues must lie within [0, 2**32)")
        return values.astype(np.uint32)


class NoveltyWindows:
    """One NoveltyWindow per site, created on first use, all with the same parameters."""

    def __init__(self, size: int = DEFAULT_WINDOW, num_perm: int = DEFAULT_NUM_PERM, *,
                 seed: int = DEFAULT_SEED, threshold: float = DEFAULT_THRESHOLD,
                 lsh_params: tuple[int, int] | None = None) -> None:
        self.size, self.num_perm, self.seed, self.threshold = size, num_perm, seed, threshold
        self.lsh_params = lsh_params
        self.hasher = MinHasher(num_perm, seed)
        self._windows: dict[str, NoveltyWindow] = {}
        _check(size, threshold)  # fail at start, not on the first record of a new site

    def get(self, site_key: str) -> NoveltyWindow:
        window = self._windows.get(site_key)
        if window is None:
            window = self._windows[site_key] = NoveltyWindow(
                site_key, self.size, self.num_perm, seed=self.seed, threshold=self.threshold,
                lsh_params=self.lsh_params, hasher=self.hasher)
        return window

    def apply_shipped(self, record: Mapping[str, Any], signature: np.ndarray | None = None) -> bool:
        site_key = record.get("site_key")
        if not isinstance(site_key, str) or not site_key:
            raise RecordError("shipped_site", f"site_key is {site_key!r}")
        return self.get(site_key).apply_shipped(record, signature)

    def sites(self) -> list[str]:
        return list(self._windows)


def shipped_record(*, site_key: str, snapshot_id: str, trace_id: str, hashvalues: Signature,
                   num_perm: int = DEFAULT_NUM_PERM, seed: int = DEFAULT_SEED,
                   at: int) -> dict[str, Any]:
    """A sampler.shipped/1 record (schemas/shipped.v1.json); hashvalues None = empty set."""
    if isinstance(hashvalues, MinHash):
        hashvalues = None if hashvalues.is_empty() else hashvalues.hashvalues
    if hashvalues is None:
        values: list[int] = []
    elif isinstance(hashvalues, np.ndarray) and hashvalues.dtype.kind in "iu":
        values = hashvalues.tolist()  # Python ints, as int(v) of each gives, in one call
    else:
        values = [int(v) for v in hashvalues]
    if values and len(values) != num_perm:
        raise ValueError(f"{len(values)} hash values for num_perm={num_perm}")
    return {"schema": "sampler.shipped/1", "site_key": site_key, "snapshot_id": snapshot_id,
            "trace_id": trace_id, "num_perm": num_perm, "seed": seed, "empty": not values,
            "hashvalues": values, "at": at}


class NoveltyPolicy:
    name = "novelty"

    def __init__(self, windows: NoveltyWindows, last_messages: int = TOKEN_MESSAGES) -> None:
        if not isinstance(last_messages, int) or last_messages < 1:
            raise ValueError(f"last_messages must be a positive integer, got {last_messages!r}")
        self.windows, self.last_messages = windows, last_messages
        self.threshold = windows.threshold
        # the signature `evaluate` scored, with the messages list it was made from, until
        # `shipped_record` of the same snapshot takes it: a forwarded turn needs it twice
        self._scored: tuple[object, np.ndarray | None] | None = None

    def signature(self, snapshot: Mapping[str, Any]) -> np.ndarray | None:
        tokens = session_tokens(snapshot["messages"], self.last_messages)
        return self.windows.hasher.hashvalues(tokens)

    def evaluate(self, snapshot: Mapping[str, Any]) -> Decision:
        hv = self.signature(snapshot)
        self._scored = (snapshot["messages"], hv)
        window = self.windows.get(snapshot["site_key"])
        novelty, closest = window.score_hashvalues(hv, exclude=snapshot["snapshot_id"])
        forward = novelty >= self.threshold
        why = ("empty token set" if hv is None else "empty window" if not len(window)
               else f"closest {closest}" if closest else "no similar entry")
        relation = ">=" if forward else "<"
        return Decision(forward=forward, reason="novelty", novelty=novelty,
                        detail=f"novelty {novelty:.3f} {relation} {self.threshold:g} ({why})")

    def shipped_record(self, snapshot: Mapping[str, Any], trace_id: str, at: int) -> dict[str, Any]:
        """What to publish on `sampler.shipped` once this snapshot is forwarded (the signature
        `evaluate` made of the same messages list just before, if it did: the same values)."""
        return self.shipped(snapshot, trace_id, at)[0]

    def shipped(self, snapshot: Mapping[str, Any], trace_id: str, at: int
                ) -> tuple[dict[str, Any], np.ndarray | None]:
        """`shipped_record`, and the signature its `hashvalues` were written from (None: empty)."""
        scored, self._scored = self._scored, None
        hv = scored[1] if scored is not None and scored[0] is snapshot["messages"] else self.signature(snapshot)
        record = shipped_record(site_key=snapshot["site_key"], snapshot_id=snapshot["snapshot_id"],
                                trace_id=trace_id, hashvalues=hv,
                                num_perm=self.windows.num_perm, seed=self.windows.seed, at=at)
        return record, hv
