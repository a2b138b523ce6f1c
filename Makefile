# Two commands for a fresh machine: `make demo` and `make test`. Both create the
# virtual environment first when it is missing or older than pyproject/constraints.

PYTHON ?= python3.11
VENV ?= .venv
# The CPU build of torch 2.13 on this machine; on a GPU machine pass your own, e.g.
#   make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline Hugging Face: models, tokenizers and datasets come from local files only.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.hf_home
export TOKENIZERS_PARALLELISM := true

.PHONY: demo demo-cli experiment test venv constraints clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,airflow]"
	touch $@

DEMO := --config configs/demo.yaml

# The Airflow DAG end to end on configs/demo.yaml (dag.test() in a fresh SQLite Airflow home
# under .airflow_demo/); prints where the weights, the DuckDB file and the run directory are.
demo: $(STAMP)
	$(BIN)/python scripts/dag_demo.py --config $(CURDIR)/configs/demo.yaml

# The same pipeline step by step from the shell, without Airflow.
demo-cli: $(STAMP)
	$(BIN)/automixer prepare $(DEMO)
	$(BIN)/automixer train-proxy $(DEMO)
	$(BIN)/automixer evaluate $(DEMO)
	$(BIN)/automixer select $(DEMO)
	$(BIN)/automixer score $(DEMO)
	$(BIN)/automixer regroup $(DEMO)
	$(BIN)/automixer mix $(DEMO)
	$(BIN)/automixer report $(DEMO)

# Does the mixture help? Every method x 3 seeds, target models, table and plot (~40 min on 2 cores).
experiment: $(STAMP)
	$(BIN)/automixer experiment --config configs/experiment_demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

# Re-pin constraints.txt from the current environment (torch and its CUDA wheels excluded).
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -viE '^(torch|nvidia-|triton)'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf runs .pytest_cache .hf_home .airflow_demo
