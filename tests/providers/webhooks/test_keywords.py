"""STOP/START keyword classification (PROVIDER-FACTS §8 item 17)."""

from __future__ import annotations

import pytest

from clinicomm.providers.webhooks import classify_keyword


@pytest.mark.parametrize(
    "body",
    ["STOP", "stop", "  Stop  ", "STOPALL", "unsubscribe", "Cancel", "END", "quit", "REVOKE",
     "OPTOUT", "opt out", "Opt  Out", "STOP.", "stop!"],
)
def test_stop_words(body: str) -> None:
    assert classify_keyword(body) == "stop"


@pytest.mark.parametrize("body", ["START", "start", " Yes ", "UNSTOP", "unstop"])
def test_start_words(body: str) -> None:
    assert classify_keyword(body) == "start"


@pytest.mark.parametrize(
    "body", [None, "", "   ", "please stop", "stop it", "STOPP", "yes please", "HELP", "Hello"]
)
def test_other_text_is_not_a_keyword(body: str | None) -> None:
    assert classify_keyword(body) is None
