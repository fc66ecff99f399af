# Two entry points: `make demo` (the main job on the embedded benchmark) and `make test`.
# Both create .venv on first use and install torch (the local CPU wheel) before the package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint install clean

$(BIN)/memguard: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/memguard

demo: install
	$(BIN)/memguard data shapes --output_dir $(DEMO_DIR)/data --seed 0
	$(BIN)/memguard train --config configs/benchmark.yaml \
		--train_data_dir $(DEMO_DIR)/data/train --output_dir $(DEMO_DIR)/baseline
	$(BIN)/memguard audit --model $(DEMO_DIR)/baseline \
		--train_data_dir $(DEMO_DIR)/data/train --output_dir $(DEMO_DIR)/baseline/audit

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) runs
