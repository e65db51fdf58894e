"""The model fingerprint by content (weights, tokenizer, chat template) and `stop` parsing, with small fake files."""

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from synth_cpt.defs.resources import LLM
from synth_cpt.generation import embedded, identity
from synth_cpt.generation.identity import MEMO, model_identity
from synth_cpt.generation.requests import MAX_STOP, Sampling

OLD = time.time_ns() - 3600 * 10**9  # an hour ago: well outside the racy window
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def fake_model(folder: Path, weights: bytes = b"\x01" * 64, template: str = TEMPLATE, age_ns: int | None = OLD) -> Path:
    """A model folder as vLLM finds it on disk: weights, config, tokenizer, chat template, plus files that do not count."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "model.safetensors": weights,
        "config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}',
        "tokenizer.json": b'{"model": {"type": "BPE", "vocab": {"a": 0}}}',
        "tokenizer_config.json": json.dumps({"chat_template": template, "eos_token": "</s>"}).encode(),
        "README.md": b"not part of the identity",
        "training_args.bin": os.urandom(16),  # trainer state: not part of the identity
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
        if age_ns is not None:
            os.utime(folder / name, ns=(age_ns, age_ns))
    return folder


@pytest.fixture
def count_hashes(monkeypatch, tmp_path):
    """Counts the files whose bytes are read; HOME in tmp_path so the fallback memo stays out of the user's cache."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    read: list[str] = []
    real = identity.file_sha256

    def counting(path):
        read.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(identity, "file_sha256", counting)
    return read


def test_same_names_and_sizes_different_bytes_are_different_models(tmp_path, count_hashes):
    a = fake_model(tmp_path / "run-a" / "checkpoint", weights=b"\x01" * 64)
    b = fake_model(tmp_path / "run-b" / "checkpoint", weights=b"\x02" * 64)
    assert model_identity(a)["digest"] != model_identity(b)["digest"]
    assert model_identity(a)["files"]["model.safetensors"] == hashlib.sha256(b"\x01" * 64).hexdigest()
    assert set(model_identity(a)["files"]) == {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"}

    ref_a, id_a = LLM(model=str(a)).resolve_model(str(tmp_path))
    ref_b, id_b = LLM(model=str(b)).resolve_model(str(tmp_path))
    assert (ref_a, ref_b) == (str(a), str(b))
    assert (id_a, id_b) == (f"checkpoint@sha256:{model_identity(a)['digest']}", f"checkpoint@sha256:{model_identity(b)['digest']}")
    assert LLM(model=str(a)).model_fingerprint(id_a) != LLM(model=str(b)).model_fingerprint(id_b)
    # the same bytes in another folder are the same model
    c = fake_model(tmp_path / "copy", weights=b"\x01" * 64)
    assert model_identity(c)["digest"] == model_identity(a)["digest"]


def test_chat_template_alone_changes_the_fingerprint(tmp_path, count_hashes):
    other = TEMPLATE.replace("<|", "[|").replace("|>", "|]")
    assert len(other) == len(TEMPLATE)
    a = fake_model(tmp_path / "a" / "m", template=TEMPLATE)
    b = fake_model(tmp_path / "b" / "m", template=other)
    assert (a / "tokenizer_config.json").stat().st_size == (b / "tokenizer_config.json").stat().st_size
    llm_a, llm_b = LLM(model=str(a)), LLM(model=str(b))
    fp_a = llm_a.model_fingerprint(llm_a.resolve_model(str(tmp_path))[1])
    assert fp_a != llm_b.model_fingerprint(llm_b.resolve_model(str(tmp_path))[1])

    # edited in place (same size, fresh mtime): seen at once, the memo does not hide it
    before = model_identity(a)["digest"]
    (a / "tokenizer_config.json").write_text(json.dumps({"chat_template": other, "eos_token": "</s>"}))
    assert model_identity(a)["digest"] != before


def test_second_call_reads_nothing(tmp_path, count_hashes):
    folder = fake_model(tmp_path / "m")
    first = model_identity(folder)
    assert sorted(count_hashes) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    memo = json.loads((folder / MEMO).read_text())
    assert set(memo["files"]) == {str(folder / n) for n in first["files"]}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")], "the memo is written through a temp file"

    count_hashes.clear()
    mtime = (folder / MEMO).stat().st_mtime_ns
    assert model_identity(folder) == first
    assert count_hashes == [], "unchanged files are not read again"
    assert (folder / MEMO).stat().st_mtime_ns == mtime, "nothing new: the memo is not rewritten"

    # one weight file replaced by another of the same size and an old mtime: only it is read again
    (folder / "model.safetensors").write_bytes(b"\x03" * 64)
    os.utime(folder / "model.safetensors", ns=(OLD + 10**9, OLD + 10**9))
    assert model_identity(folder)["digest"] != first["digest"]
    assert count_hashes == ["model.safetensors"]


def test_fresh_files_are_not_memoized(tmp_path, count_hashes):
    """A file written within the last two seconds may change again within one timestamp tick: hashed again next time."""
    folder = fake_model(tmp_path / "m", age_ns=None)
    model_identity(folder)
    count_hashes.clear()
    model_identity(folder)
    assert sorted(count_hashes) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_memo_falls_back_to_the_user_cache(tmp_path, count_hashes):
    folder = fake_model(tmp_path / "m")
    (folder / MEMO).mkdir()  # the folder's memo cannot be written (as a read-only folder, but also for root)
    first = model_identity(folder)
    cached = list((tmp_path / "home" / ".cache" / "synth-cpt" / "hashes").glob("*.json"))
    assert len(cached) == 1 and str(folder / "model.safetensors") in json.loads(cached[0].read_text())["files"]
    count_hashes.clear()
    assert model_identity(folder) == first and count_hashes == []


def test_corrupt_memo_is_ignored(tmp_path, count_hashes):
    folder = fake_model(tmp_path / "m")
    first = model_identity(folder)
    (folder / MEMO).write_text("{not json")
    count_hashes.clear()
    assert model_identity(folder) == first
    assert sorted(count_hashes) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_folder_without_weights_is_refused(tmp_path, count_hashes):
    folder = fake_model(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weight files"):
        model_identity(folder)


def test_embedded_model_is_not_rehashed_per_engine(tmp_path, monkeypatch, count_hashes):
    monkeypatch.setenv(embedded.MODELS_ENV, str(tmp_path / "models"))
    folder = fake_model(tmp_path / "models" / embedded.NAME)
    info = {"name": embedded.NAME, "weights_sha256": hashlib.sha256(b"\x01" * 64).hexdigest()}
    (folder / embedded.MARKER).write_text(json.dumps(info))
    path, identity_a = LLM().resolve_model(str(tmp_path))
    assert path == str(folder) and identity_a == f"{embedded.NAME}@sha256:{model_identity(folder)['digest']}"
    count_hashes.clear()
    assert LLM().resolve_model(str(tmp_path)) == (path, identity_a)
    assert count_hashes == [], "a verified embedded model is not read again"

    # weights that no longer match the marker are not trusted
    (folder / "model.safetensors").write_bytes(b"\x09" * 64)
    assert embedded.verify(folder) is None


def test_huggingface_name_is_identified_by_its_cached_snapshot(tmp_path, monkeypatch, count_hashes):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = "a" * 40
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = fake_model(repo / "snapshots" / commit)
    ref, ident = LLM(model="org/tiny").resolve_model(str(tmp_path))
    assert Path(ref) == snapshot and ident == f"org/tiny@sha256:{model_identity(snapshot)['digest']}"
    assert LLM(model="org/absent").resolve_model(str(tmp_path)) == ("org/absent", "org/absent")


def test_openai_revision_is_part_of_the_fingerprint():
    def served(**kw):
        return LLM(backend="openai", endpoints=["http://127.0.0.1:1/v1"], served_model_name="m", **kw)

    r1, r2, none = served(model_revision="r1"), served(model_revision="r2"), served()
    assert len({r1.model_fingerprint("embedded"), r2.model_fingerprint("embedded"), none.model_fingerprint("embedded")}) == 3
    # without a revision the fingerprint is what it was before the field existed: existing caches stay valid
    assert none.model_fingerprint("embedded") == hashlib.sha256(json.dumps({"served_model": "m"}).encode()).hexdigest()[:16]
    assert r1.served_identity() == "m@r1" and none.served_identity() == "m"
    assert "model_revision" in LLM.model_fields and "fingerprint" in LLM.model_fields["model_revision"].description


# ---- stop: one string is one sequence -----------------------------------------------------------------


def write_prompt(root: Path, sampling: dict) -> Path:
    import yaml

    path = root / "rewrite" / "p.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "p", "description": "a test prompt", "user": "{{ text }}", "sampling": sampling}))
    return path


@pytest.mark.parametrize(("stop", "expected"), [("###", ("###",)), (["###", "\n\n"], ("###", "\n\n")), (None, ()), ([], ())])
def test_prompt_file_stop(tmp_path, stop, expected):
    from synth_cpt.synthesis.prompts import load_prompt

    write_prompt(tmp_path, {"temperature": 0.2, "stop": stop})
    prompt = load_prompt("rewrite", "p", root=tmp_path)
    assert prompt.sampling().stop == expected
    request = prompt.request("en", seed=7, text="hello")
    assert request.sampling.stop == expected and request.sampling.seed == 7 and request.sampling.temperature == 0.2
    assert request.sampling.as_dict()["stop"] == list(expected)


@pytest.mark.parametrize("stop", [5, "", ["###", ""], [1, 2], [["#"]], True, {"a": "b"}, ["x"] * (MAX_STOP + 1)])
def test_prompt_file_bad_stop_names_file_and_field(tmp_path, stop):
    from synth_cpt.synthesis.prompts import load_prompt

    path = write_prompt(tmp_path, {"stop": stop})
    with pytest.raises(ValueError, match="'stop'") as err:
        load_prompt("rewrite", "p", root=tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("field", "value"), [("temperature", "hot"), ("max_tokens", 2.5), ("top_p", None), ("seed", True)])
def test_bad_numbers_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"x.yaml: '{field}'"):
        Sampling.from_dict({field: value}, where="x.yaml")


def test_sampling_itself_never_splits_a_string():
    assert Sampling(stop="###").stop == ("###",)
    assert Sampling.from_dict({"stop": "###", "max_tokens": 8.0}).max_tokens == 8
    assert Sampling.from_dict(None) == Sampling()
    with pytest.raises(ValueError, match="mapping"):
        Sampling.from_dict(["stop"], where="x.yaml")


def test_cli_generate_input_stop(tmp_path):
    from synth_cpt.cli.generation import _read_chat_requests

    msgs = [{"role": "user", "content": "hi"}]
    good = tmp_path / "in.jsonl"
    good.write_text("\n".join(json.dumps({"messages": msgs, **extra}) for extra in ({"stop": "###"}, {"stop": ["a", "b"]}, {})) + "\n")
    assert [r.sampling.stop for r in _read_chat_requests(str(good))] == [("###",), ("a", "b"), ()]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": msgs, "stop": "###"}) + "\n" + json.dumps({"messages": msgs, "stop": [1]}) + "\n")
    with pytest.raises(SystemExit) as err:
        _read_chat_requests(str(bad))
    message = str(err.value)
    assert f"{bad}:2" in message and "'stop'" in message and f"{bad}:1" not in message
