# Quick start (Debian/Ubuntu, Python 3.10+):
#   make demo   # start the service on embedded defaults, push a clip of a real face, print verdicts
#   make test   # the test suite (real redis-server, Ray, PyAV, Prometheus)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled

.PHONY: install artifacts system-deps demo test bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Test-only system tools: ffmpeg (HLS/RTMP test servers), redis-server, prometheus + promtool,
# chromium + chromedriver (the review page's browser test).
system-deps:
	@missing=""; for c in ffmpeg redis-server prometheus promtool chromium chromedriver; do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq ffmpeg redis-server prometheus chromium chromium-driver >/dev/null; \
	fi

# The shipped model's ONNX export, where replicas load it (they then start in seconds).
artifacts: install
	$(BIN)/pel export --for-service

demo: artifacts
	$(BIN)/pel demo

test: install system-deps
	$(BIN)/pytest -q -p no:cacheprovider

bench: install
	$(BIN)/python -m bench.bench_model
	$(BIN)/python -m bench.bench_pipeline

clean:
	rm -rf $(VENV) build *.egg-info
