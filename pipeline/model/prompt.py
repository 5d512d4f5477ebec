"""Who answered a turn (`agent_id`) and which prompt started it (`prompt_ref`): the two facts
the panel's splitter pairs assistant messages by, and the sampler's pair window is keyed by.

`agent_id` is `<providerID>/<modelID>:<agent>` from opencode's message info (an assistant
message names the model that answered; a user message the model it asked for). It passes the
scrub stage as an identifier, like a tool name, so it is held to a strict alphabet: anything
outside it (a provider or agent name someone typed with spaces, say) is replaced by a hash of
itself, never passed on as free text.

`prompt_ref` fingerprints the user prompt that started the turn:
- its visible text parts (synthetic and ignored parts left out, as a rater never sees them),
  Unicode NFC, whitespace runs folded to one space, ends trimmed; case kept (`Foo` and `foo`
  name different identifiers in code);
- with the project id: opencode derives it from the repository's first commit, so the same
  repository has the same id on every machine, and "fix the failing test" in two different
  repositories is not the same task; every directory outside git shares `global`;
- without the directory: the same checkout lives at different paths on different machines,
  which is exactly the bake-off this is for.
It is an HMAC under `PIPELINE_PROMPT_REF_KEY` when that is set: a plain hash of the prompt would
let anyone who sees the scrubbed trace test guesses of what the scrubber took out of it
(`my token is <SECRET_1>` against its hash). Without the key it is a plain SHA-256, and ingest
says so at start. Every ingest replica must share the key: a changed key changes every
prompt_ref, so turns before and after the change never pair.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

PROMPT_REF_KEY_VARIABLE = "PIPELINE_PROMPT_REF_KEY"
PROMPT_REF_PREFIX = "pr_"
# What may pass the scrub stage unscrubbed as these identifiers (the schemas say the same).
AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._@+\-/:]{1,200}")
PROMPT_REF_PATTERN = re.compile(r"pr_[0-9a-f]{32}")
_SPACES = re.compile(r"\s+")


def normalised_prompt(text: str) -> str:
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _visible_text(message: Mapping[str, Any]) -> str:
    texts = []
    for part in message.get("parts") or []:
        if (isinstance(part, Mapping) and part.get("type") == "text" and not part.get("synthetic")
                and not part.get("ignored") and isinstance(part.get("text"), str)):
            texts.append(part["text"])
    return "\n".join(texts)


def prompt_ref(text: str, project_id: str | None, key: bytes | None = None) -> str | None:
    """`pr_<32 hex>` of a prompt's text in its project; None for a prompt with no text."""
    normal = normalised_prompt(text)
    if not normal:
        return None
    material = f"{project_id or ''}\x00{normal}".encode("utf-8", "surrogatepass")
    digest = hmac.digest(key, material, "sha256") if key else hashlib.sha256(material).digest()
    return PROMPT_REF_PREFIX + digest.hex()[:32]


def turn_start(messages: Sequence[Mapping[str, Any]]) -> int | None:
    """Index of the user message that started the last turn (the last user message)."""
    for i in range(len(messages) - 1, -1, -1):
        info = messages[i].get("info") or {}
        if info.get("role") == "user":
            return i
    return None


def turn_prompt_ref(messages: Sequence[Mapping[str, Any]], project_id: str | None,
                    key: bytes | None = None) -> str | None:
    """The prompt_ref of the last turn of an opencode listing (`[{info, parts}]`)."""
    start = turn_start(messages)
    return None if start is None else prompt_ref(_visible_text(messages[start]), project_id, key)


def agent_id(info: Mapping[str, Any]) -> str | None:
    """`<providerID>/<modelID>:<agent>` of one message's info, or None when it names no model."""
    model = info.get("model")
    if type(model) is not dict and not isinstance(model, Mapping):  # a decoded dict skips the ABC check
        model = info
    provider, model_id = model.get("providerID"), model.get("modelID")
    if not isinstance(provider, str) or not isinstance(model_id, str) or not provider or not model_id:
        return None
    agent = info.get("agent")
    if not isinstance(agent, str):
        agent = info.get("mode")
    return _agent_id(provider, model_id, agent if isinstance(agent, str) else "")


# A trace asks for the agent_id of every message, and a session names a model or two: the
# pattern check (and a hash for what fails it) is made once per (provider, model, agent).
@functools.lru_cache(maxsize=1024)
def _agent_id(provider: str, model_id: str, agent: str) -> str:
    text = f"{provider}/{model_id}" + (f":{agent}" if agent else "")
    if AGENT_ID_PATTERN.fullmatch(text):
        return text
    return "agent_" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def turn_agent_id(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """Who answered the last turn: the agent_id of its last assistant message."""
    start = turn_start(messages) or 0
    for message in reversed(messages[start:]):
        info = message.get("info") or {}
        if info.get("role") == "assistant":
            return agent_id(info)
    return None
