"""Pure delivery rules: the circuit breaker, retry and backoff, signing and attestations."""
