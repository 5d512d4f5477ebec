"""The records and their pure rules: envelopes, session snapshots, traces, outcomes, and the
one reader and writer of every topic's records (`records.py`). Nothing here needs a broker."""
