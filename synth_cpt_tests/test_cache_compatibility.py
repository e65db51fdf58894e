"""Upgrading synth-cpt must not make the cache miss: the request ids of the WRAP styles, the bulk of a run, are
pinned to the ids the previous release computed (same prompt files, same fingerprint), so a rerun after an
upgrade sends nothing that was already generated."""

import pytest

from synth_cpt.synthesis.prompts import load_prompt

# computed by the release before issue 16 (commit 9181e61) for this request and fingerprint
PINNED = {
    "easy": "8765d34817a5213fe829c7537f12707298b40a26c3f9691c1b254aa2bbbe5350",
    "medium": "b0bb326183a3b1f9860a5ab6fa82b882f7af10d7dbbb5f47e75cc8ebf8a8b1d6",
    "hard": "703ccfcf059112a891d7d56773b5da116799d2f4598126bf3e9aba1af7c9aaac",
    "qa": "11cb359b5b89443c5ea6aceb192b9f0264d5f5a3f71c9b884708cac5ab5e0acb",
}


@pytest.mark.parametrize("style", sorted(PINNED))
def test_wrap_request_ids_are_the_previous_releases(style):
    request = load_prompt("rewrite", style).request("pt", seed=1234, text="Em 1500 a frota chegou.", context="", title="")
    assert request.request_id("fp-test") == PINNED[style]
