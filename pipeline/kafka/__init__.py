"""Kafka plumbing: topic administration, consumer lag, dead letters, the key partitioner."""
