import pytest

from synth_cpt.core.config import ConfigError, load_config, parse_config


def test_shipped_defaults_match_methods(isolated_env):
    cfg = load_config()
    assert cfg.languages == ("pt", "en")
    assert cfg.quality.combine == "max"
    high, low = cfg.quality.buckets["high"], cfg.quality.buckets["low"]
    assert high.contains(2.51) and not high.contains(2.5)
    assert low.contains(0.5) and low.contains(2.0) and not low.contains(2.01) and not low.contains(0.49)


def test_env_names_the_config_file(isolated_env, tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text("languages: [pt]\nsubsets: {default_budget_tokens: 5}\n")
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(path))
    cfg = load_config()
    assert cfg.languages == ("pt",) and cfg.subsets.budget_for("pt|high") == 5


def test_storage_root_env_wins(isolated_env, monkeypatch):
    cfg = parse_config("storage_root: /data/x\n", "t")
    assert cfg.storage_uri() == "/data/x"
    monkeypatch.setenv("SYNTH_CPT_HOME", "s3://bucket/prefix")
    assert cfg.storage_uri() == "s3://bucket/prefix"


@pytest.mark.parametrize(
    "text, field, problem",
    [
        ("quality:\n  buckets:\n    high: {gt: high}\n", "quality.buckets.high.gt", "valid number"),
        ("quality:\n  buckets:\n    high: {gt: 3, ge: 2}\n", "quality.buckets.high", "only one of 'gt' and 'ge'"),
        ("quality:\n  buckets:\n    'a|b': {gt: 3}\n", "quality.buckets", "partition key"),
        ("languages: [Portuguese]\n", "languages", "ISO 639"),
        ("limits: {max_quarantine_rate: 1.5}\n", "limits.max_quarantine_rate", "less than or equal to 1"),
        ("drops: {locaton: /x}\n", "drops.locaton", "Extra inputs are not permitted"),
        ("subsets: {budget_tokens: {'fr|high': 10}}\n", "(top level)", "not partitions"),
        ("quality: {scores: [edu, clarity]}\n", "(top level)", "clarity"),
    ],
)
def test_bad_config_names_file_field_and_problem(tmp_path, text, field, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert field in msg
    assert problem in msg


def test_yaml_syntax_error_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("languages: [pt\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_an_overlay_holds_only_what_it_changes(isolated_env, tmp_path):
    """`extends` merges a file over the shipped defaults (or another file): the demo profile is one."""
    demo = load_config(str(__import__("synth_cpt").__path__[0]) + "/defaults/demo.yaml")
    defaults = load_config()
    assert (demo.synthesis.max_documents, demo.synthesis.min_pass_rate) == (2, 0.0)
    assert (defaults.synthesis.max_documents, defaults.synthesis.min_pass_rate) == (None, 0.5)
    assert demo.model_dump(exclude={"synthesis", "mixes"}) == defaults.model_dump(exclude={"synthesis", "mixes"})
    assert set(demo.mixes.recipes) == set(defaults.mixes.recipes) == {"originals_repeated", "rewrites_1to3", "wrap_1to1", "entigraph"}
    assert demo.mixes.recipes["wrap_1to1"].on_shortfall == "take_available" and defaults.mixes.recipes["wrap_1to1"].on_shortfall == "fail"
    base = tmp_path / "base.yaml"
    base.write_text("extends: defaults\nlanguages: [pt]\nsynthesis: {max_documents: 7, entigraph: {triples_per_document: 0}}\n")
    top = tmp_path / "top.yaml"
    top.write_text("extends: base.yaml\nsynthesis: {entigraph: {max_entities: 5}}\n")
    cfg = load_config(top)
    assert cfg.languages == ("pt",) and cfg.synthesis.max_documents == 7
    assert (cfg.synthesis.entigraph.triples_per_document, cfg.synthesis.entigraph.max_entities) == (0, 5)
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="makes a loop"):
        load_config(loop)
    with pytest.raises(ConfigError, match="extends: 'nope.yaml' is not a file"):
        parse_config("extends: nope.yaml\n", "x.yaml", tmp_path)
