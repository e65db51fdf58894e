"""The lineage catalog: one DuckDB connection with a view over every output, so any lineage question is
one SQL query (`synth-cpt sql`), and the common ones are functions (`synth-cpt lineage ...`).

The views of the first list read only what readers see: for versioned outputs the version each
`current.json` points at (drops, synthesis, mixes), never a candidate. The `all_*` views and
`mix_versions` read every version still retained (published once, not yet removed by `synth-cpt gc`),
each row naming its `version` and whether it is `current`, so a shard of a mix re-made since is still
explained through the exact inputs its version pinned. Local files are read by DuckDB
itself; on S3 the same files are registered as pyarrow datasets over the S3 filesystem, so nothing is
downloaded whole and no DuckDB extension is needed.

  drops         documents of every drop's published version
  quarantine    rejected records of every drop's published version
  documents     raw_corpus, every partition
  subsets       quality_subsets, every partition
  generations   the generation cache, every segment (one row per LLM call)
  synthetic     rows of every rewrites_<style> and entigraph_corpus partition (+ asset; language and quality
                are the partition's)
  rejects       rejected generations of the same (+ asset, language, quality)
  shards        rows of every training mix shard (+ mix, language, quality, shard)
  manifests     one row per mix partition: recipe, seed, tokens, drops, prompts, models (JSON), the Dagster run
  mix_versions  one row per retained mix version (+ version, current, prefix, inputs: the pinned inputs as JSON)
  all_shards    rows of every retained mix version's shards (+ mix, language, quality, version, current, shard, filename)
  all_synthetic rows of every retained version of rewrites_<style> and entigraph_corpus (+ asset, language, quality,
                version, current, prefix: the version folder a mix pins)
  pinned_subsets  quality_subsets partitions as mixes read them, kept by content (+ pin: the key, language, quality)
"""

from __future__ import annotations

import json
from typing import Any

import duckdb
import pyarrow as pa

from synth_cpt.core.contracts import MIX_SHARD, QUARANTINE
from synth_cpt.core.contracts import SYNTHETIC as SYNTHETIC_SCHEMA
from synth_cpt.core.contracts import SYNTHETIC_REJECTS as REJECTS_SCHEMA
from synth_cpt.core.layout import (
    CRAWL_DROPS,
    ENTIGRAPH_CORPUS,
    GENERATIONS,
    POINTER,
    QUALITY_SUBSETS,
    RAW_CORPUS,
    REWRITES,
    SNAPSHOTS,
    SYNTHETIC_REJECTS,
    SYNTHETIC_ROWS,
    TRAINING_MIX,
)
from synth_cpt.core.publish import LEGACY, published, published_partitions, published_versions
from synth_cpt.core.retention import mix_pins, versioned_outputs
from synth_cpt.core.storage import LocalStorage, Storage
from synth_cpt.generation.cache import SCHEMA as GENERATION_ROWS

VIEWS = ("drops", "quarantine", "documents", "subsets", "generations", "synthetic", "rejects", "shards", "mix_versions",
         "manifests", "all_shards", "all_synthetic", "pinned_subsets")  # fmt: skip


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _literal(value: str | bool) -> str:
    return ("TRUE" if value else "FALSE") if isinstance(value, bool) else _quote(value)


class Catalog:
    def __init__(self, storage: Storage, con: duckdb.DuckDBPyConnection | None = None) -> None:
        self.storage = storage
        self.con = con or duckdb.connect()
        self.con.execute("SET threads TO 2")
        self.local = isinstance(storage, LocalStorage)
        self._keys = storage.list("")
        for view in VIEWS:
            getattr(self, f"_view_{view}")()

    # -- helpers ------------------------------------------------------------------------------------------
    def _source(self, view: str, i: int, keys: list[str]) -> str:
        """One group of files as a relation: DuckDB's own reader locally; on S3 a pyarrow dataset over the
        S3 filesystem (ranged reads, no download, no DuckDB extension)."""
        if self.local:
            paths = [str(self.storage.path(k)) for k in keys]  # type: ignore[attr-defined]
            listed = ", ".join(_quote(p) for p in paths)  # string literals, quotes escaped
            return f"read_parquet([{listed}], union_by_name = true)"
        import pyarrow.dataset as ds

        dataset = ds.dataset([self.storage.uri(k).removeprefix("s3://") for k in keys], format="parquet",
                             filesystem=self.storage.filesystem)  # type: ignore[attr-defined]  # fmt: skip
        name = f"_{view}_{i}"
        self.con.register(name, dataset)
        return name

    def _files(
        self, groups: list[tuple[list[str], dict[str, Any]]], view: str, empty: pa.Schema | list[str], extra: tuple[str, ...] = ()
    ) -> None:
        """A view over groups of Parquet files, each group with constant columns (asset, language, ...): a
        UNION ALL of one branch per group, so a filter on a constant (WHERE asset = 'rewrites_easy') skips
        whole groups unread, and no join is needed. A file's own column of a constant's name gives way."""
        groups = [(keys, consts) for keys, consts in groups if keys]
        if not groups:  # nothing published yet: an empty view with the contract's columns, so queries still bind
            schema = empty if isinstance(empty, pa.Schema) else pa.schema([(c, pa.string()) for c in empty])
            for name in extra:
                if name not in schema.names:
                    schema = schema.append(pa.field(name, pa.bool_() if name == "current" else pa.string()))
            self.con.register(f"_{view}_empty", schema.empty_table())
            self.con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM _{view}_empty")
            return
        branches = []
        for i, (keys, consts) in enumerate(groups):
            source = self._source(view, i, keys)
            if not consts:
                branches.append(f"SELECT * FROM {source}")
                continue
            own = ", ".join(_quote(n) for n in consts)
            values = ", ".join(f"{_literal(v)} AS {n}" for n, v in consts.items())
            branches.append(f"SELECT COLUMNS(lambda c: c NOT IN ({own})), {values} FROM {source}")
        self.con.execute(f"CREATE OR REPLACE VIEW {view} AS " + " UNION ALL BY NAME ".join(branches))

    def _published(self, asset_prefix: str, file: str) -> list[tuple[list[str], dict[str, str]]]:
        parts = [p for p in published_partitions(self.storage, asset_prefix) if f"{p.prefix}/{file}" in self._key_set]
        return [([f"{p.prefix}/{file}"], {"asset": p.asset, "language": p.language, "quality": p.quality}) for p in parts]

    @property
    def _key_set(self) -> set[str]:
        if not hasattr(self, "_set"):
            self._set = set(self._keys)
        return self._set

    def _drop_files(self, name: str) -> list[str]:
        keys = []
        for key in self._keys:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == CRAWL_DROPS and parts[2] == POINTER:
                pointer = self.storage.read_json(key)
                if f"{pointer['prefix']}/{name}" in self._key_set:
                    keys.append(f"{pointer['prefix']}/{name}")
        return sorted(keys)

    # -- the views ----------------------------------------------------------------------------------------
    def _view_drops(self) -> None:
        self._files([(self._drop_files("docs.parquet"), {})], "drops", ["doc_id", "drop_id", "language", "quality"])

    def _view_quarantine(self) -> None:
        self._files([(self._drop_files("quarantine.parquet"), {})], "quarantine", QUARANTINE)

    def _view_documents(self) -> None:
        keys = sorted(k for k in self._keys if k.startswith(f"{RAW_CORPUS}/") and k.endswith("/part-0.parquet"))
        self._files([(keys, {})], "documents", ["doc_id", "drop_id", "source_file", "language", "quality"])

    def _view_subsets(self) -> None:
        keys = sorted(k for k in self._keys if k.startswith(f"{QUALITY_SUBSETS}/") and k.endswith("/part-0.parquet"))
        self._files([(keys, {})], "subsets", ["doc_id", "drop_id", "language", "quality"])

    def _view_generations(self) -> None:
        """One group per scope folder (`segments/<asset>/<language>/<quality>/`), so a query that names
        the scopes it needs reads only their segments."""
        prefix = f"{GENERATIONS}/segments/"
        by_scope: dict[str, list[str]] = {}
        for key in self._keys:
            if key.startswith(prefix) and key.endswith(".parquet"):
                by_scope.setdefault(key[len(prefix) :].rsplit("/", 1)[0], []).append(key)
        groups = []
        for scope, keys in sorted(by_scope.items()):
            parts = scope.split("/")
            asset, language, quality = parts[:3] if len(parts) >= 3 else (scope, "", "")
            groups.append((sorted(keys), {"scope_path": scope, "asset": asset, "language": language, "quality": quality}))
        self._files(groups, "generations", GENERATION_ROWS, ("scope_path", "asset", "language", "quality"))

    def _view_synthetic(self) -> None:
        groups = self._published(REWRITES, SYNTHETIC_ROWS) + self._published(ENTIGRAPH_CORPUS, SYNTHETIC_ROWS)
        self._files(groups, "synthetic", SYNTHETIC_SCHEMA, ("asset", "language", "quality"))

    def _view_rejects(self) -> None:
        groups = self._published(REWRITES, SYNTHETIC_REJECTS) + self._published(ENTIGRAPH_CORPUS, SYNTHETIC_REJECTS)
        self._files(groups, "rejects", REJECTS_SCHEMA, ("asset", "language", "quality"))

    def _view_shards(self) -> None:
        """One group per shard file, its mix, partition, shard name and path (`filename`) as constants."""
        groups = []
        for p in published_partitions(self.storage, TRAINING_MIX):
            for key in sorted(k for k in self._keys if k.startswith(f"{p.prefix}/shard-") and k.endswith(".parquet")):
                path = str(self.storage.path(key)) if self.local else self.storage.uri(key)  # type: ignore[attr-defined]
                consts = {"mix": p.asset.removeprefix(TRAINING_MIX), "language": p.language, "quality": p.quality,
                          "shard": key.rsplit("/", 1)[1], "filename": path}  # fmt: skip
                groups.append(([key], consts))
        self._files(groups, "shards", MIX_SHARD, ("mix", "language", "quality", "shard", "filename"))

    def _view_manifests(self) -> None:
        """The manifest of each published mix: the current rows of `mix_versions` (one reading of a manifest)."""
        self.con.execute(
            "CREATE OR REPLACE VIEW manifests AS SELECT mix, language, quality, uri, recipe_sha, seed, tokens, documents, shards, "
            "by_origin, drops, prompt_shas, model_fingerprints, tokenizer_sha, run_id FROM mix_versions WHERE current"
        )

    def _retained(self, asset_prefix: str) -> list[tuple[str, str, str, str, str, bool]]:
        """(asset, language, quality, partition prefix, version, current) of every retained version of the
        `language|quality` partitions of assets whose name starts with `asset_prefix`, oldest first."""
        found = []
        for prefix in versioned_outputs(self.storage, self._keys):
            parts = prefix.split("/")
            if len(parts) != 3 or not parts[0].startswith(asset_prefix):
                continue
            pointer = published(self.storage, prefix)
            current = pointer["version"] if pointer and pointer["version"] != LEGACY else None
            for version in published_versions(self.storage, prefix, self._keys):
                found.append((parts[0], parts[1], parts[2], prefix, version, version == current))
        return found

    def _view_mix_versions(self) -> None:
        rows = []
        for asset, language, quality, prefix, version, current in self._retained(TRAINING_MIX):
            folder = f"{prefix}/v/{version}"
            if f"{folder}/manifest.json" not in self._key_set:
                continue
            m = self.storage.read_json(f"{folder}/manifest.json")
            inputs = mix_pins(self.storage, prefix, version)
            rows.append([asset.removeprefix(TRAINING_MIX), language, quality, version, current, folder, self.storage.uri(folder),
                         m["recipe_sha"], m["seed"], m["tokens"], m["documents"], len(m["shards"]), json.dumps(m["by_origin"]),
                         json.dumps(m["drops"]), json.dumps(m["prompt_shas"]), json.dumps(m["model_fingerprints"]), m["tokenizer_sha"],
                         m.get("run_id"), None if inputs is None else json.dumps(inputs)])  # fmt: skip
        self.con.execute(
            "CREATE OR REPLACE TABLE mix_versions (mix VARCHAR, language VARCHAR, quality VARCHAR, version VARCHAR, current BOOLEAN, "
            "prefix VARCHAR, uri VARCHAR, recipe_sha VARCHAR, seed BIGINT, tokens BIGINT, documents BIGINT, shards BIGINT, by_origin JSON, "
            "drops JSON, prompt_shas JSON, model_fingerprints JSON, tokenizer_sha VARCHAR, run_id VARCHAR, inputs JSON)"
        )
        if rows:
            self.con.executemany("INSERT INTO mix_versions VALUES (" + ", ".join("?" * 19) + ")", rows)

    def _view_all_shards(self) -> None:
        groups = []
        for asset, language, quality, prefix, version, current in self._retained(TRAINING_MIX):
            folder = f"{prefix}/v/{version}/"
            for key in sorted(k for k in self._keys if k.startswith(f"{folder}shard-") and k.endswith(".parquet")):
                path = str(self.storage.path(key)) if self.local else self.storage.uri(key)  # type: ignore[attr-defined]
                consts = {"mix": asset.removeprefix(TRAINING_MIX), "language": language, "quality": quality, "version": version,
                          "current": current, "shard": key.rsplit("/", 1)[1], "filename": path}  # fmt: skip
                groups.append(([key], consts))
        self._files(groups, "all_shards", MIX_SHARD, ("mix", "language", "quality", "version", "current", "shard", "filename"))

    def _view_all_synthetic(self) -> None:
        groups = []
        for asset, language, quality, prefix, version, current in self._retained(REWRITES) + self._retained(ENTIGRAPH_CORPUS):
            key = f"{prefix}/v/{version}/{SYNTHETIC_ROWS}"
            if key in self._key_set:
                consts = {"asset": asset, "language": language, "quality": quality, "version": version, "current": current,
                          "prefix": f"{prefix}/v/{version}"}  # fmt: skip
                groups.append(([key], consts))
        self._files(groups, "all_synthetic", SYNTHETIC_SCHEMA, ("asset", "language", "quality", "version", "current", "prefix"))

    def _view_pinned_subsets(self) -> None:
        groups = []
        for key in self._keys:
            parts = key.split("/")
            if len(parts) == 5 and parts[0] == QUALITY_SUBSETS and parts[3] == SNAPSHOTS and key.endswith(".parquet"):
                groups.append(([key], {"pin": key, "language": parts[1], "quality": parts[2]}))
        self._files(groups, "pinned_subsets", ["doc_id", "drop_id", "language", "quality"], ("pin",))

    def columns(self, view: str) -> set[str]:
        """The columns a view has (a column some producers add, e.g. drop_version, may be absent)."""
        return {r[0] for r in self.con.execute(f"DESCRIBE {view}").fetchall()}

    # -- queries ------------------------------------------------------------------------------------------
    def sql(self, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        cursor = self.con.execute(query)
        return [d[0] for d in cursor.description or []], cursor.fetchall()
