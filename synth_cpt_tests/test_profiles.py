"""The shipped profiles route only styles that exist, and the demo proves every shipped style."""

from __future__ import annotations

from importlib import resources

import pytest

from synth_cpt.core.config import PROFILES, default_config_text, load_config, parse_config
from synth_cpt.synthesis.prompts import load_kind, prompts_dir
from synth_cpt.synthesis.routing import check_routing, why_not_routed


def test_the_demo_routes_every_shipped_style_to_a_bucket():
    demo = load_config(str(resources.files("synth_cpt").joinpath("defaults/demo.yaml")))
    styles = load_kind("rewrite")
    assert sorted(styles) == sorted(p.stem for p in (prompts_dir() / "rewrite").glob("*.yaml")) != [], "every shipped style is checked"
    check_routing(demo.synthesis, styles)
    unrouted = sorted(name for name, p in styles.items() if all(why_not_routed(demo.synthesis, p, b) for b in demo.quality.buckets))
    assert unrouted == []


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_shipped_profile_names_existing_styles_and_buckets(profile):
    config = parse_config(default_config_text(), "defaults")
    synthesis = config.synthesis.model_copy(update={"profile": profile})
    check_routing(synthesis, load_kind("rewrite"))
    assert set(synthesis.routes() or {}) <= set(config.quality.buckets)


def test_rewire_routes_the_guided_rewrite_to_the_low_bucket_only():
    assert PROFILES["rewire"] == {"low": ("guided",)}
