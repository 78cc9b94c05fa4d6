# The whole dev loop. CPU path: a local virtual environment with the CPU build of torch.
# On a GPU node install with `pip install -e ".[gpu]"` instead, which takes the CUDA build of
# torch (README "On a GPU node").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: install demo test test-fast test-measured test-slurm lint format assets clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU wheel first: a bare torch requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install  ## SFT then SimPO on the tiny recipe, on the CPU, in well under 5 minutes
	$(BIN)/simpo train tiny --output-dir outputs/tiny

# Two pytest workers (pytest-xdist), a test file whole on one of them: its module fixtures are
# built once, and the many tests that wait on a subprocess leave a core to the other worker.
PYTEST_WORKERS ?= 2
test: install  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25 -m "not measured"

test-fast: install  ## everything but the end-to-end CLI runs
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow and not measured"

# The shipped CPU demos run whole, asserting what their headers and the README claim (minutes).
test-measured: install  ## tiny-iterative's three rounds: none falls, the last beats one round
	$(BIN)/python -m pytest -q -s -m measured

# A one-node SLURM cluster (slurm-wlm + munge, as root) in $(SLURM_DIR) for the SLURM tests, stopped
# by its pid files afterwards whatever the tests did.
SLURM_DIR ?= /tmp/simpo-slurm
test-slurm: install  ## the SLURM tests, on a one-node cluster started here (root, slurm-wlm, munge)
	scripts/slurm/local_cluster.sh start $(SLURM_DIR)
	SIMPO_TEST_SLURM_CONF=$(SLURM_DIR)/slurm.conf $(BIN)/python -m pytest -q -m slurm tests/test_slurm.py; \
	  status=$$?; scripts/slurm/local_cluster.sh stop $(SLURM_DIR); exit $$status

lint: install  ## formatting, lint, and the package's layer order (scripts/check_layers.py)
	$(BIN)/ruff format --check simpo_cli tests scripts
	$(BIN)/ruff check simpo_cli tests scripts
	$(BIN)/python scripts/check_layers.py

format: install
	$(BIN)/ruff format simpo_cli tests scripts
	$(BIN)/ruff check --fix simpo_cli tests scripts

assets: install  ## rebuild the tiny recipe's tokenizer and data (deterministic)
	$(BIN)/python scripts/build_tiny_assets.py

clean:
	rm -rf $(VENV) outputs .pytest_cache *.egg-info
