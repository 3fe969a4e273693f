# Two commands on a fresh machine:  `make demo` (set up + run the CPU demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests and the demo never download weights: without this, an open_clip pretrained tag spends
# ~47 s in hub retries before failing on an offline machine.
export HF_HUB_OFFLINE ?= 1
# Ray writes here; keeps runs of the demo and tests out of the home directory's /tmp clutter.
export RAY_DEDUP_LOGS ?= 0

.PHONY: install browser demo test test-quick lint format bench clean

install: $(STAMP)

# Install order matters: DeepSpeed is an sdist whose setup.py imports torch, so torch (pinned with
# its matching torchvision) goes in first and DeepSpeed builds against it without build isolation
# (no second multi-GB torch download into an isolated build env; no ops are compiled at install).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet "torch==2.15.0" "torchvision==0.29.2"
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed==0.19.8"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip check
	touch $(STAMP)

# Debian's chromium + chromedriver, for the search page's browser test (tests/ray/test_serve_browser.py skips,
# saying so, without them). Installed only as root with apt-get (CI); elsewhere this says what is missing.
browser:
	@if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then \
		echo "chromium and chromedriver: found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
			|| echo "could not install chromium/chromedriver: the browser test will skip"; \
	else \
		echo "no chromium/chromedriver and not root with apt-get: the browser test will skip (install chromium chromium-driver)"; \
	fi

demo: $(STAMP)
	$(BIN)/galaxalign demo --out runs/demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Unit tests only (no Ray cluster, no multi-minute end-to-end runs).
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The CPU benchmarks, one after another (each prints its figures and a last `name: value` line).
# benchmarks/gpu_train.py needs an NVIDIA GPU and is run by hand there.
bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/zero_memory.py
	$(BIN)/python benchmarks/eval_scale.py
	$(BIN)/python benchmarks/catalog_scale.py
	$(BIN)/python benchmarks/embed_scale.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf runs .pytest_cache
