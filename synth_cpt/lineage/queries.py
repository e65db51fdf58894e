"""The common lineage questions, each a few SQL queries over the catalog's views."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synth_cpt.lineage.catalog import Catalog


def _rows(catalog: Catalog, query: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = catalog.con.execute(query, params)
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _asset_of(origin: str) -> str | None:
    if origin.startswith("rewrite:"):
        return "rewrites_" + origin.split(":", 1)[1]
    return "entigraph_corpus" if origin == "entigraph" else None


def _in(values: list[str]) -> str:
    return "(" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")" if values else "(NULL)"


def _shard_file(catalog: Catalog, path: str) -> dict[str, Any]:
    """The retained mix version a shard file (any format) belongs to, by its name and version folder."""
    name = Path(path).name.replace(".jsonl.zst", ".parquet").replace(".bin", ".parquet").replace(".idx", ".parquet")
    folder = Path(path).parent.name
    head = _rows(catalog, "SELECT DISTINCT mix, language, quality, version, current, filename FROM all_shards WHERE shard = ? AND ends_with(filename, ?)",
                 [name, f"/{folder}/{name}"])  # fmt: skip
    if not head:
        raise LookupError(
            f"{path}: not a shard of a retained training mix version (removed by `synth-cpt gc`, or never published; "
            f'see `synth-cpt sql "SELECT mix, language, quality, version, current, uri FROM mix_versions"`)'
        )
    return head[0]


def shard(catalog: Catalog, path: str, prompts: bool = False) -> dict[str, Any]:
    """A shard file of any retained version of a mix: which version it belongs to and which is current,
    its recipe, tokens by origin, and every drop, document, prompt, model and run behind it, traced
    through the input versions that mix version pinned (not the ones in force today).

    The shard is read once into a temporary table; synthetic rows and generations are then looked up
    only in the pinned versions and the scopes its origins name (the catalog prunes the rest unread).
    `prompts`: with the exact text of every prompt file behind it (from the prompt archive)."""
    head = _shard_file(catalog, path)
    mix = {k: head[k] for k in ("mix", "language", "quality")}
    catalog.con.execute("CREATE OR REPLACE TEMP TABLE this_shard AS SELECT * FROM all_shards WHERE filename = ?", [head["filename"]])
    by_origin = _rows(catalog, "SELECT origin, count(*) AS documents, sum(n_tokens) AS tokens FROM this_shard GROUP BY 1 ORDER BY 1", [])
    drops = [r["drop_id"] for r in _rows(catalog, "SELECT DISTINCT drop_id FROM this_shard ORDER BY 1", [])]
    documents = _rows(catalog, "SELECT count(DISTINCT doc_id) AS n FROM this_shard", [])[0]["n"]
    version = _rows(catalog, "SELECT recipe_sha, seed, uri, tokenizer_sha, run_id AS mix_run, inputs FROM mix_versions "
                    "WHERE mix = ? AND language = ? AND quality = ? AND version = ?", [*mix.values(), head["version"]])  # fmt: skip
    manifest = version[0] if version else {}
    current = _rows(
        catalog, "SELECT version FROM mix_versions WHERE mix = ? AND language = ? AND quality = ? AND current", list(mix.values())
    )
    inputs = json.loads(manifest.pop("inputs")) if manifest.get("inputs") else None
    assets = sorted({a for r in by_origin if (a := _asset_of(r["origin"]))})
    if inputs is not None:  # the exact versions this mix version read
        pinned = [i["prefix"] for i in inputs if i.get("asset") in assets]
        where, params = f"y.prefix IN {_in(pinned)}", []
        traced = "the input versions this mix version pinned"
    else:  # made before mixes pinned their inputs: the versions in force are the best there is
        where, params = f"y.asset IN {_in(assets)} AND y.language = ? AND y.quality = ? AND y.current", [mix["language"], mix["quality"]]
        traced = "the input versions in force now (this mix version was made before inputs were pinned)"
    lineage = ", y.drop_version" if "drop_version" in catalog.columns("all_synthetic") else ", NULL AS drop_version"
    catalog.con.execute(
        f"CREATE OR REPLACE TEMP TABLE this_made AS SELECT y.synth_id, y.asset, y.version, y.prompt_sha, y.model_fingerprint, y.request_ids, "
        f"y.drop_id{lineage} FROM all_synthetic y WHERE {where} AND y.synth_id IN (SELECT synth_id FROM this_shard)",
        params,
    )
    made = _rows(
        catalog, "SELECT prompt_sha, model_fingerprint, asset, version, count(*) AS rows FROM this_made GROUP BY ALL ORDER BY 3, 1", []
    )
    runs = _rows(
        catalog,
        f"SELECT min(g.created_at) AS first, max(g.created_at) AS last, count(DISTINCT g.request_id) AS generations FROM generations g "
        f"WHERE g.asset IN {_in(assets)} AND g.language = ? AND g.quality = ? "
        f"AND g.request_id IN (SELECT DISTINCT u.rid FROM this_made, unnest(request_ids) AS u(rid))",
        [mix["language"], mix["quality"]],
    )
    answer = {"shard": str(path), **mix, "version": head["version"], "current_version": current[0]["version"] if current else None,
              "is_current": bool(head["current"]), **manifest, "traced_through": traced,
              "inputs": [{k: i.get(k) for k in ("component", "asset", "version", "prefix")} for i in inputs or []],
              "by_origin": by_origin, "documents": documents, "drops": drops, "drop_versions": _drop_versions(catalog, inputs),
              "made_by": made, "generations": runs[0] if runs else {}}  # fmt: skip
    if prompts:
        answer["prompts"] = [prompt(catalog, sha) for sha in sorted({r["prompt_sha"] for r in made if r["prompt_sha"]})]
    return answer


def _drop_versions(catalog: Catalog, inputs: list[dict] | None) -> list[dict[str, Any]]:
    """The drop version behind each row of this_shard, where the rows' producers record it (drop_version):
    synthetic rows through this_made, originals through the subset the mix version pinned."""
    parts, params = ["SELECT drop_id, drop_version, count(*) AS rows FROM this_made WHERE drop_version IS NOT NULL GROUP BY ALL"], []
    subset = next((i["prefix"] for i in inputs or [] if i.get("component") == "original"), None)
    if subset and "drop_version" in catalog.columns("pinned_subsets"):
        parts.append(
            "SELECT p.drop_id, p.drop_version, count(*) AS rows FROM this_shard s JOIN pinned_subsets p ON p.pin = ? "
            "AND p.doc_id = s.doc_id WHERE s.origin = 'original' AND p.drop_version IS NOT NULL GROUP BY ALL"
        )
        params.append(subset)
    query = " UNION ALL ".join(parts)
    return _rows(catalog, f"SELECT drop_id, drop_version, sum(rows)::BIGINT AS rows FROM ({query}) GROUP BY ALL ORDER BY ALL", params)


def prompt(catalog: Catalog, sha: str) -> dict[str, Any]:
    """The exact text of the prompt file with this SHA (a unique prefix of one a row names will do): from
    the prompt archive, else from the installed prompt library if a file there still has these bytes."""
    from synth_cpt.generation.prompt_archive import archived_prompt

    if len(sha) < 64:
        known = {r["prompt_sha"] for r in _rows(catalog, "SELECT DISTINCT prompt_sha FROM all_synthetic WHERE starts_with(prompt_sha, ?) "
                                                          "UNION SELECT DISTINCT prompt_sha FROM generations WHERE starts_with(prompt_sha, ?)", [sha, sha])}  # fmt: skip
        if len(known) != 1:
            raise LookupError(f"{len(known)} prompt SHAs named by rows or generations start with {sha!r}")
        sha = known.pop()
    text = archived_prompt(catalog.storage, sha)
    if text is not None:
        return {"prompt_sha": sha, "source": "prompt archive", "text": text}
    found = _in_library(sha)
    if found is not None:
        return {"prompt_sha": sha, "source": f"prompt library ({found[0]}; not archived)", "text": found[1]}
    return {"prompt_sha": sha, "source": "not archived, and no file of the prompt library has these bytes", "text": None}


def _in_library(sha: str) -> tuple[str, str] | None:
    import hashlib

    from synth_cpt.synthesis.prompts import PromptError, prompts_dir

    try:
        root = prompts_dir()
    except PromptError:
        return None
    for path in sorted(root.glob("*/*.yaml")):
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == sha:
            return str(path.relative_to(root)), data.decode("utf-8")
    return None


def doc(catalog: Catalog, doc_id: str, prompts: bool = False) -> dict[str, Any]:
    """A document (or a unique prefix of its id): where it came from, every synthetic descendant, every shard
    holding it (of the mixes in force, then of every retained mix version). `prompts`: with the prompt texts."""
    ids = [r["doc_id"] for r in _rows(catalog, "SELECT DISTINCT doc_id FROM documents WHERE starts_with(doc_id, ?)", [doc_id])]
    if len(ids) != 1:
        raise LookupError(f"{len(ids)} documents of raw_corpus match {doc_id!r}")
    full = ids[0]
    source = _rows(catalog, "SELECT drop_id, source_file, source_line, language, quality FROM documents WHERE doc_id = ?", [full])
    descendants = _rows(
        catalog,
        "SELECT asset, language, quality, kind, style, synth_id, len(request_ids) AS generations, n_tokens FROM synthetic "
        "WHERE doc_id = ? ORDER BY asset, synth_id",
        [full],
    )
    rejected = _rows(catalog, "SELECT asset, reason_code, count(*) AS n FROM rejects WHERE doc_id = ? GROUP BY ALL ORDER BY 1, 2", [full])
    shards = _rows(
        catalog,
        "SELECT mix, language, quality, shard, origin, count(*) AS copies FROM shards WHERE doc_id = ? GROUP BY ALL ORDER BY 1, 4, 5",
        [full],
    )
    versions = _rows(
        catalog,
        "SELECT mix, language, quality, version, current, shard, origin, count(*) AS copies FROM all_shards WHERE doc_id = ? "
        "GROUP BY ALL ORDER BY 1, 2, 3, 4, 6, 7",
        [full],
    )
    answer = {"doc_id": full, "source": source[0] if source else {}, "synthetic": descendants, "rejected": rejected, "shards": shards,
              "shards_of_every_version": versions}  # fmt: skip
    if prompts:
        shas = {
            r["prompt_sha"]
            for r in _rows(catalog, "SELECT DISTINCT prompt_sha FROM all_synthetic WHERE doc_id = ?", [full])
            if r["prompt_sha"]
        }
        answer["prompts"] = [prompt(catalog, sha) for sha in sorted(shas)]
    return answer


def drop(catalog: Catalog, drop_id: str) -> dict[str, Any]:
    """Everything made from a drop: documents, quarantine, subsets, synthetic rows by asset, mix rows by mix."""
    one = lambda q: _rows(catalog, q, [drop_id])  # noqa: E731
    return {
        "drop_id": drop_id,
        "documents": one("SELECT count(*) AS n FROM drops WHERE drop_id = ?")[0]["n"],
        "quarantined": one("SELECT count(*) AS n FROM quarantine WHERE drop_id = ?")[0]["n"],
        "in_raw_corpus": one("SELECT language, quality, count(*) AS documents FROM documents WHERE drop_id = ? GROUP BY ALL ORDER BY ALL"),
        "in_subsets": one("SELECT language, quality, count(*) AS documents FROM subsets WHERE drop_id = ? GROUP BY ALL ORDER BY ALL"),
        "synthetic": one("SELECT asset, language, quality, count(*) AS rows, sum(n_tokens) AS tokens FROM synthetic WHERE drop_id = ? GROUP BY ALL ORDER BY ALL"),
        "shards": one("SELECT mix, language, quality, origin, count(*) AS rows, sum(n_tokens) AS tokens FROM shards WHERE drop_id = ? GROUP BY ALL ORDER BY ALL"),
    }  # fmt: skip
