"""The common lineage questions, each a few SQL queries over the catalog's views."""

from __future__ import annotations

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


def shard(catalog: Catalog, path: str) -> dict[str, Any]:
    """A shard file: its mix, recipe, tokens by origin, and every drop, document, prompt, model and run behind it.

    The shard is read once into a temporary table; synthetic rows and generations are then looked up
    only in the assets and scopes its origins name (the catalog prunes the rest unread)."""
    name = Path(path).name.replace(".jsonl.zst", ".parquet").replace(".bin", ".parquet").replace(".idx", ".parquet")
    folder = Path(path).parent.name
    head = _rows(catalog, "SELECT DISTINCT mix, language, quality, filename FROM shards WHERE shard = ? AND ends_with(filename, ?)",
                 [name, f"/{folder}/{name}"])  # fmt: skip
    if not head:
        raise LookupError(f"{path}: not a shard of a published training mix (see `synth-cpt sql \"SELECT DISTINCT filename FROM shards\"`)")
    mix = {k: head[0][k] for k in ("mix", "language", "quality")}
    catalog.con.execute("CREATE OR REPLACE TEMP TABLE this_shard AS SELECT * FROM shards WHERE filename = ?", [head[0]["filename"]])
    by_origin = _rows(catalog, "SELECT origin, count(*) AS documents, sum(n_tokens) AS tokens FROM this_shard GROUP BY 1 ORDER BY 1", [])
    drops = [r["drop_id"] for r in _rows(catalog, "SELECT DISTINCT drop_id FROM this_shard ORDER BY 1", [])]
    documents = _rows(catalog, "SELECT count(DISTINCT doc_id) AS n FROM this_shard", [])[0]["n"]
    assets = sorted({a for r in by_origin if (a := _asset_of(r["origin"]))})
    where = f"y.asset IN {_in(assets)} AND y.language = ? AND y.quality = ?"
    catalog.con.execute(
        f"CREATE OR REPLACE TEMP TABLE this_made AS SELECT y.synth_id, y.asset, y.prompt_sha, y.model_fingerprint, y.request_ids "
        f"FROM synthetic y WHERE {where} AND y.synth_id IN (SELECT synth_id FROM this_shard)",
        [mix["language"], mix["quality"]],
    )
    made = _rows(catalog, "SELECT prompt_sha, model_fingerprint, asset, count(*) AS rows FROM this_made GROUP BY ALL ORDER BY 3, 1", [])
    manifest = _rows(catalog, "SELECT recipe_sha, seed, uri, tokenizer_sha, run_id AS mix_run FROM manifests WHERE mix = ? AND language = ? AND quality = ?",
                     [mix["mix"], mix["language"], mix["quality"]])  # fmt: skip
    runs = _rows(
        catalog,
        f"SELECT min(g.created_at) AS first, max(g.created_at) AS last, count(DISTINCT g.request_id) AS generations FROM generations g "
        f"WHERE g.asset IN {_in(assets)} AND g.language = ? AND g.quality = ? "
        f"AND g.request_id IN (SELECT DISTINCT u.rid FROM this_made, unnest(request_ids) AS u(rid))",
        [mix["language"], mix["quality"]],
    )
    return {"shard": path, **mix, **(manifest[0] if manifest else {}), "by_origin": by_origin, "documents": documents,
            "drops": drops, "made_by": made, "generations": runs[0] if runs else {}}  # fmt: skip


def doc(catalog: Catalog, doc_id: str) -> dict[str, Any]:
    """A document (or a unique prefix of its id): where it came from, every synthetic descendant, every shard holding it."""
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
    return {"doc_id": full, "source": source[0] if source else {}, "synthetic": descendants, "rejected": rejected, "shards": shards}


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
