"""pipeline/kafka/partitioner.py is Kafka's default partitioner, as aiokafka implements it."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from pipeline.kafka.partitioner import key_partitioner, murmur2


@given(st.binary(max_size=300))
def test_murmur2_is_aiokafkas(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)


def test_murmur2_of_every_length_up_to_four_words_and_the_java_clients_values() -> None:
    for n in range(20):
        data = bytes(range(200, 200 + n))
        assert murmur2(data) == aiokafka_murmur2(data)
    # the Java client's own cases (UtilsTest.testMurmur2), there as signed ints
    java = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
            b"a-little-bit-longer-string": -1486304829,
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, b"abc": 479470107}
    for key, signed in java.items():
        assert murmur2(key) == signed & 0xFFFFFFFF


@given(st.binary(min_size=1, max_size=80), st.integers(min_value=1, max_value=64))
def test_a_key_goes_where_aiokafka_sends_it(key: bytes, partitions: int) -> None:
    everything = list(range(partitions))
    assert key_partitioner(key, everything, everything) == DefaultPartitioner()(key, everything, everything)


def test_a_keyless_record_goes_to_an_available_partition() -> None:
    assert {key_partitioner(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert key_partitioner(None, [0, 1], []) in {0, 1}
