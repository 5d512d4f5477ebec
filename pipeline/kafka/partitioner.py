"""Kafka's default key partitioner (murmur2 of the key bytes), computed faster.

Every producer of a topic must send a key to the same partition, so records of one session or
trace stay in order, and a faust table written outside a stream (agents/base.state_table) finds
its changelog partition the same way. This is the Java client's and aiokafka's function, byte
for byte (tests/unit/kafka/test_partitioner.py compares them); it reads the key's 4-byte words
with one struct call instead of indexing byte by byte, since it runs for every record written.
"""

from __future__ import annotations

import functools
import random
import struct
from collections.abc import Callable, Sequence

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


@functools.lru_cache(maxsize=64)  # one per key length in use
def _words(count: int) -> Callable[[bytes], tuple[int, ...]]:
    return struct.Struct(f"<{count}I").unpack_from


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2) as an unsigned 32-bit int."""
    length = len(data)
    h = _SEED ^ length
    count = length >> 2
    if count:
        for k in _words(count)(data):
            k = (k * _M) & _MASK
            k ^= k >> 24
            h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    tail = length & 3
    if tail:
        base = length - tail
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def key_partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """aiokafka's DefaultPartitioner: a key's partition from murmur2, a keyless record anywhere."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[(murmur2(key) & 0x7FFFFFFF) % len(all_partitions)]
