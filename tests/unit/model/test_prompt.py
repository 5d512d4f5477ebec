"""pipeline/model/prompt.py: the prompt fingerprint and who answered, as the pair window and the
panel's splitter read them."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.model.prompt import (
    AGENT_ID_PATTERN,
    agent_id,
    normalised_prompt,
    prompt_ref,
    turn_agent_id,
    turn_prompt_ref,
)


def user(text: str, **part: Any) -> dict[str, Any]:
    return {"info": {"id": "msg_u", "role": "user"}, "parts": [{"type": "text", "text": text, **part}]}


def assistant(provider: str = "anthropic", model: str = "claude-sonnet-4", agent: str = "build") -> dict[str, Any]:
    return {"info": {"id": "msg_a", "role": "assistant", "providerID": provider, "modelID": model, "agent": agent},
            "parts": [{"type": "text", "text": "ok"}]}


def test_whitespace_and_unicode_form_do_not_count_case_does() -> None:
    base = prompt_ref("Fix the  failing\ttest\n", "proj")
    assert base == prompt_ref("  Fix the failing test", "proj")
    assert prompt_ref("caf\u00e9", "p") == prompt_ref("cafe\u0301", "p")  # NFC
    assert base != prompt_ref("fix the failing test", "proj")


def test_the_project_counts_and_an_empty_prompt_has_no_ref() -> None:
    assert prompt_ref("fix it", "proj_a") != prompt_ref("fix it", "proj_b")
    assert prompt_ref(" \n\t", "proj") is None


def test_a_key_makes_it_an_hmac() -> None:
    plain = prompt_ref("fix it", "p")
    keyed = prompt_ref("fix it", "p", b"k1")
    assert plain != keyed != prompt_ref("fix it", "p", b"k2")
    assert keyed == prompt_ref("fix it", "p", b"k1")
    assert keyed is not None and keyed.startswith("pr_") and len(keyed) == 35


def test_the_turn_is_the_last_user_message_and_hidden_parts_do_not_count() -> None:
    listing = [user("first question"), assistant(), user("second question"), assistant()]
    assert turn_prompt_ref(listing, "p") == prompt_ref("second question", "p")
    attached = [user("second question"), assistant()]
    attached[0]["parts"].append({"type": "text", "text": "<file contents>", "synthetic": True})
    assert turn_prompt_ref(attached, "p") == prompt_ref("second question", "p")
    assert turn_prompt_ref([assistant()], "p") is None


def test_who_answered() -> None:
    assert turn_agent_id([user("q"), assistant()]) == "anthropic/claude-sonnet-4:build"
    asked = {"role": "user", "agent": "plan", "model": {"providerID": "openai", "modelID": "gpt-5"}}
    assert agent_id(asked) == "openai/gpt-5:plan"
    assert agent_id({"role": "assistant", "providerID": "p", "modelID": "m", "mode": "build"}) == "p/m:build"
    assert agent_id({"role": "assistant"}) is None
    assert turn_agent_id([user("q")]) is None


@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=20))
def test_an_agent_id_is_never_free_text(provider: str, model: str, agent: str) -> None:
    found = agent_id({"providerID": provider, "modelID": model, "agent": agent})
    assert found is None or AGENT_ID_PATTERN.fullmatch(found)


@pytest.mark.parametrize("text", ["a  b", "a\u00a0b", " a b "])
def test_normalised_prompt_folds_whitespace(text: str) -> None:
    assert normalised_prompt(text) == "a b"


def reference_agent_id(info: Any) -> str | None:
    """agent_id as it was before it remembered its answers per (provider, model, agent)."""
    model = info.get("model") if isinstance(info.get("model"), Mapping) else info
    provider, model_id = model.get("providerID"), model.get("modelID")
    if not isinstance(provider, str) or not isinstance(model_id, str) or not provider or not model_id:
        return None
    agent = info.get("agent") if isinstance(info.get("agent"), str) else info.get("mode")
    text = f"{provider}/{model_id}" + (f":{agent}" if isinstance(agent, str) and agent else "")
    if AGENT_ID_PATTERN.fullmatch(text):
        return text
    return "agent_" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


NAME = st.sampled_from(["anthropic", "openai", "p", "claude-sonnet-4", "gpt 5", "m", "", "\u00e9", "\ud800"])
FIELD = NAME | st.text(max_size=6) | st.none() | st.integers() | st.booleans() | st.lists(NAME, max_size=1)
NAMING = st.fixed_dictionaries({}, optional={"providerID": FIELD, "modelID": FIELD})


@given(st.fixed_dictionaries({}, optional={"providerID": FIELD, "modelID": FIELD, "agent": FIELD, "mode": FIELD,
                                          "model": NAMING | FIELD}))
def test_an_agent_id_is_what_it_was_before_it_was_remembered(info: dict[str, Any]) -> None:
    # asked twice: computed, then remembered
    assert agent_id(info) == reference_agent_id(info) == agent_id(info)
