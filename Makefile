# Trackstar Mirror. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create ./.venv and install the project with its dev tools

up: $(STAMP) ## run the mirror: embedded PostgreSQL unless DATABASE_URL is set
	$(BIN)/mirror up

test: $(STAMP) ## run the test suite against a real PostgreSQL (DATABASE_URL or embedded)
	$(BIN)/python -m pytest -m "not slow"

PG_BIN ?= /usr/lib/postgresql/15/bin

test-slow: $(STAMP) ## run the long tests (crash, outage, flood, failover, multi-host)
	@missing=""; test -x $(PG_BIN)/initdb || missing="postgresql-15"; \
		command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || missing="$$missing haproxy"; \
		if [ -n "$$missing" ]; then echo "installing $$missing for the failover and multi-host rigs"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	MIRROR_PG_BIN=$(PG_BIN) $(BIN)/python -m pytest -m slow

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check mirror projections tests $(wildcard bench)
	$(BIN)/mypy

bench: $(STAMP) ## run the benchmarks, print the table, write bench/results.json
	$(BIN)/python -m bench

clean: ## remove the venv and caches (keeps ./.data)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

.PHONY: help install up test test-slow lint bench clean
