"""Clients of the services the pipeline talks to: opencode daemons, the scrubber, the panel,
all built on the one HTTP setup in `http.py`."""
