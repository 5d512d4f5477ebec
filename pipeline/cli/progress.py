"""Progress while a command waits: a spinner on stderr that says what it waits for.

An operator who sees nothing for five seconds cannot tell a slow broker from a hung command,
so every wait that can last over a second (connecting to Kafka, the second lag sample, an
opencode turn) runs inside `waiting(...)`. On a terminal that is a rich status line on
stderr, cleared when the wait ends; when stderr is not a terminal (a pipe, a log file, a
health check) nothing is written at all, so scripts read only the answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def waiting(what: str) -> Iterator[Callable[[str], None]]:
    """Show `what` with a spinner on stderr while the block runs, on a terminal only. Yields
    a function that replaces the text (the next step of the same wait)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda _text: None
        return
    with console.status(what) as status:
        yield lambda text: status.update(text)
