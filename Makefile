# The README's commands. Each creates/refreshes a virtual environment per interpreter
# (.venv-3.13, .venv-3.11, ...) idempotently: the install step re-runs only when pyproject.toml or
# the requested jax changes.
#
#   make test                          the newest CPython >= 3.11 (pyenv, else PATH), newest jax
#   make test PYTHON=python3.11 JAX=0.10.2
#   make test PYTHON=3.12              a version, a command on PATH, a path, or '>=3.12'
# .ci/run runs `make test` at both ends of the supported range.
#   make bench                         microbenchmarks (pytest-benchmark), see README
#   make mutants                       the mutation campaign (long; not part of CI)
PYTHON ?= >=3.11
JAX ?=
PY_EXE := $(shell .ci/find-python '$(PYTHON)')
ifeq ($(PY_EXE),)
$(error no interpreter for PYTHON='$(PYTHON)' (see the message above; .ci/find-python))
endif
PY_VER := $(shell '$(PY_EXE)' -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VENV ?= .venv-$(PY_VER)
PY := $(VENV)/bin/python
JAX_PIN := $(if $(JAX),'jax[tpu]==$(JAX)' 'jaxlib==$(JAX)',)
STAMP := $(VENV)/.installed-jax-$(if $(JAX),$(JAX),newest)

.PHONY: test demo bench bench-ci mutants install versions clean peers static-peers

$(STAMP): pyproject.toml
	test -x $(PY) || '$(PY_EXE)' -m venv $(VENV)
	rm -f $(VENV)/.installed-jax-*
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,tpu,train]' $(JAX_PIN)
	touch $(STAMP)

install: $(STAMP)

versions: $(STAMP)
	@$(PY) -c 'import sys, importlib.metadata as m; print("python", sys.version.split()[0], *("%s %s" % (d, m.version(d)) for d in ("jax", "jaxlib", "libtpu", "flax", "numpy")))'

test: versions
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m bench.demo

# The pytest-benchmark suite (bench/micro): catalogue shapes, compiled, on a TPU; tiny shapes
# (interpreted kernels and xla twins, marked as CPU figures) elsewhere. BENCH_ARGS go to pytest.
bench: $(STAMP)
	$(PY) -m pytest bench/micro $(BENCH_ARGS)

# CI's step: the suite once, quickly, to prove the harness runs (no assertion on any time).
bench-ci: $(STAMP)
	mkdir -p out
	$(PY) -m pytest bench/micro -q --benchmark-min-rounds=1 --benchmark-max-time=0.05 \
	    --benchmark-json=out/bench-micro-cpu.json

# The mutation campaign (tests/mutation.py; not part of CI): plants each curated bug in a copy of
# the tree, runs the tests that should catch it, prints caught / survived and the caught rate.
mutants: $(STAMP)
	$(PY) -m tests.mutation --min-rate 95 $(MUTANTS_ARGS)

# The peers for `bench static` side by side (bench/kernels/peer_*.py): tpu-inference 0.32.0 (RPA v3,
# its RejectionSampler) and tokamax 0.0.17 (batched ragged paged attention), in a venv of their
# own on CPython >= 3.12 with the newest jax. Not dependencies of the library and none of their
# code is in this tree: tpu-inference pins jax 0.11.2 and pulls in vLLM, so both go in with
# --no-deps, plus the few packages their kernel modules import.
PEERS_PY_EXE := $(shell .ci/find-python '>=3.12' 2>/dev/null)
PEERS_VENV ?= .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed-peers
PEERS_PINS := tpu-inference==0.32.0 tokamax==0.0.17

$(PEERS_STAMP): pyproject.toml
	test -n '$(PEERS_PY_EXE)' || { echo 'make peers needs CPython >= 3.12 (.ci/find-python)'; exit 1; }
	test -x $(PEERS_PY) || '$(PEERS_PY_EXE)' -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PEERS_PY) -m pip install --quiet --disable-pip-version-check -e '.[test,tpu]'
	$(PEERS_PY) -m pip install --quiet --disable-pip-version-check --no-deps $(PEERS_PINS)
	$(PEERS_PY) -m pip install --quiet --disable-pip-version-check absl-py einshape jaxtyping \
	    pydantic immutabledict typing_extensions
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)
	@$(PEERS_PY) -c 'import importlib.metadata as m; print(*("%s %s" % (d, m.version(d)) for d in ("jax", "libtpu", "tpu-inference", "tokamax")))'

# The whole static table, ours and the peers side by side (v5p unless STATIC_ARGS says otherwise).
static-peers: peers
	$(PEERS_PY) -m bench static --all $(STATIC_ARGS)

clean:
	rm -rf .venv-* .venv .pytest_cache .hypothesis .benchmarks
