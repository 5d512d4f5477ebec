"""The `pipeline` command (`main.py`), its `lag` subcommand (`lag.py`, also runnable alone) and
how both report a failure in one line (`errors.py`)."""
