# plcsense: `make demo` runs the main job, `make test` the tests. Both set up .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint broker clean

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

demo: venv broker
	$(BIN)/plcsense demo

test: venv broker
	$(BIN)/ruff check plcsense tests bench
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check plcsense tests bench
	$(BIN)/ruff format --check plcsense tests bench

clean:
	rm -rf $(VENV) .demo .pytest_cache
