"""The development kit: a real local Kafka broker, contract-enforcing stub panel and scrubber,
the scripted model behind real opencode daemons, the local stack and the demo.

Its own distribution (`devkit/pyproject.toml`), installed by `./dev setup` beside the product;
nothing under `pipeline/` or `agents/` imports it (tests/unit/test_layers.py checks).
"""
