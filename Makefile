# The README's two commands: `make demo` and `make test`. Each builds .venv from nothing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: setup test lint demo model clean

# surgery_r1_interfaces is the ROS 2 interface package (ament_cmake + rosidl), built by CMake through
# scikit-build-core; its build requirements come with requirements/ros.txt, hence --no-build-isolation.
$(STAMP): requirements/core.txt requirements/ros.txt requirements/dev.txt setup.py \
		$(wildcard surgery_r1_interfaces/*.txt surgery_r1_interfaces/*.toml surgery_r1_interfaces/*.xml \
			surgery_r1_interfaces/cmake/* surgery_r1_interfaces/msg/* surgery_r1_interfaces/srv/* surgery_r1_interfaces/action/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet $(TORCH) -r requirements/core.txt -r requirements/ros.txt -r requirements/dev.txt
	$(PIP) install --quiet --no-build-isolation ./surgery_r1_interfaces
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/surgery-r1 demo

model: setup
	$(BIN)/surgery-r1 train builtin --out surgery_r1_ros/resources/builtin_model

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
