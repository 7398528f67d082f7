# The job's developer commands. `make` alone lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where the CPU build of torch comes from: PIP_FIND_LINKS (a local wheel folder) when set, else TORCH_INDEX.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SOURCE = $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url $(TORCH_INDEX))
CONTAINER_ENGINE ?= $(shell command -v podman >/dev/null && echo podman || echo docker)
IMAGE ?= finetune-job
IMAGE_VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
PODMAN = $(filter podman,$(notdir $(CONTAINER_ENGINE)))
# podman on these machines: runc (crun cannot set rlimits here), host networking for the package indexes,
# and the machine's wheel folder and CA bundle (PIP_FIND_LINKS, PIP_CERT) mounted for the build only.
ENGINE_FLAGS = $(if $(PODMAN),--runtime runc)
BUILD_FLAGS = $(ENGINE_FLAGS) $(if $(PODMAN),--network host \
  $(if $(PIP_FIND_LINKS),-v $(PIP_FIND_LINKS):/run/wheels:ro --build-arg PIP_FIND_LINKS=/run/wheels) \
  $(if $(PIP_CERT),-v $(PIP_CERT):/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt))

.PHONY: help  ## list the targets
help:
	@grep -E '^\.PHONY: [a-z0-9-]+ +## ' $(MAKEFILE_LIST) | sed -E 's/^\.PHONY: ([a-z0-9-]+) +## (.*)/  make \1\t\2/' | expand -t 22

.PHONY: setup  ## create .venv with the locked CPU dependency set and the dev tools (Python 3.11+)
setup: $(VENV)/.installed

$(VENV)/.installed: requirements/dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SOURCE) -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

.PHONY: lock  ## pin every package of the CPU, dev and GPU sets (requirements/*.txt) with uv
lock:  # uses .venv's uv, not setup: setup installs from these files
	$(BIN)/uv pip compile -q pyproject.toml requirements/cpu.in $(TORCH_SOURCE) --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --no-emit-find-links --no-emit-index-url -o requirements/cpu.txt
	$(BIN)/uv pip compile -q pyproject.toml requirements/cpu.in --extra dev -c requirements/cpu.txt $(TORCH_SOURCE) \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-find-links --no-emit-index-url \
	  -o requirements/dev.txt
	# Universal: the GPU image's Python is Ubuntu 24.04's 3.12; Debian 12's 3.11 and other bases install it too.
	$(BIN)/uv pip compile -q pyproject.toml --extra gpu --universal --python-version 3.11 -o requirements/gpu.txt

# The GPU set as wheels for a machine without a package index (README: Air-gapped clusters): its Python, and the
# packages it already has or does not need (e.g. `pip list --format=freeze | cut -d= -f1` run there).
WHEELHOUSE ?= .gpu-wheels
WHEELHOUSE_PYTHON ?= 3.12
WHEELHOUSE_EXCLUDE ?=

.PHONY: wheelhouse  ## download requirements/gpu.txt as wheels for an offline machine, less WHEELHOUSE_EXCLUDE
wheelhouse: setup
	$(BIN)/python tools/wheelhouse.py --out $(WHEELHOUSE) --python-version $(WHEELHOUSE_PYTHON) \
	  $(if $(strip $(WHEELHOUSE_EXCLUDE)),--exclude $(strip $(WHEELHOUSE_EXCLUDE)))

.PHONY: demo  ## dry-run the job end to end against a local S3 server on the bundled sample data
demo: setup
	$(BIN)/python demo/run.py

.PHONY: test  ## run the test suite on every core (CPU; starts its own S3 server)
test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadgroup tests

.PHONY: test-image  ## run the dry run inside the CPU image, read-only as uid 10001 (after make image-cpu)
test-image: setup
	FINETUNE_IMAGE=$(IMAGE):cpu CONTAINER_ENGINE=$(CONTAINER_ENGINE) $(BIN)/python -m pytest -q tests/test_image.py

.PHONY: lint  ## ruff, hadolint on the Dockerfile, actionlint on the GitHub workflow
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint --failure-threshold warning Dockerfile
	$(BIN)/actionlint .github/workflows/*.yml

.PHONY: image  ## build the GPU image (CONTAINER_ENGINE=docker|podman, IMAGE=name)
image:
	$(CONTAINER_ENGINE) build $(BUILD_FLAGS) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	  --build-arg IMAGE_VERSION=$(IMAGE_VERSION) -t $(IMAGE):gpu .

.PHONY: image-cpu  ## build the CPU image (BASE_IMAGE=debian:bookworm-slim by default)
image-cpu:
	$(CONTAINER_ENGINE) build $(BUILD_FLAGS) --build-arg VARIANT=cpu --build-arg BASE_IMAGE=$(or $(BASE_IMAGE),debian:bookworm-slim) \
	  $(if $(PIP_FIND_LINKS),,--build-arg PIP_EXTRA_INDEX_URL=$(TORCH_INDEX)) --build-arg IMAGE_VERSION=$(IMAGE_VERSION) -t $(IMAGE):cpu .

.PHONY: run-local  ## run the GPU image with ./.env, a model cache volume and the GPUs
run-local:
	$(CONTAINER_ENGINE) run --rm $(ENGINE_FLAGS) --gpus all --env-file .env --read-only \
	  --tmpfs /tmp:exec -v finetune-scratch:/scratch $(IMAGE):gpu

.PHONY: bench-dry-run  ## time the dry run on 1,000 rows (the contract: under two minutes on two cores)
bench-dry-run: setup
	$(BIN)/python bench/dry_run.py

.PHONY: bench-data  ## the data stage on CPU: 3,000,000 rows' memory and tokenizing rate, a restart, the dry run on 300,000
bench-data: setup
	$(BIN)/python bench/data_scale.py

.PHONY: bench  ## GPU benchmark: unsloth vs hf, 1B and 8B shapes, multi-GPU scaling, the whole job on Alpaca-like rows (on a GPU host)
bench:
	$(PYTHON) bench/run.py

.PHONY: k8s-render  ## write k8s/job.yaml (kubectl apply -f) from the kustomize base k8s/base/
k8s-render: setup
	@{ sed -n '1,/^---$$/p' k8s/job.yaml | sed '$$d'; echo "---"; $(BIN)/kubectl kustomize k8s/; } > .k8s-job.yaml
	@mv .k8s-job.yaml k8s/job.yaml && echo "k8s/job.yaml written"

.PHONY: k8s-validate  ## build every kustomization and validate it, and k8s/job.yaml, strictly against Kubernetes 1.37
k8s-validate: setup
	@set -e; for dir in k8s k8s/multi-gpu k8s/multi-node k8s/sweep k8s/kueue; do \
	  $(BIN)/kubectl kustomize $$dir > .k8s-rendered.yaml; \
	  $(BIN)/kubernetes-validate --strict --quiet -k 1.37.0 .k8s-rendered.yaml; echo "$$dir: valid"; \
	done; rm -f .k8s-rendered.yaml
	@set -e; for file in k8s/job.yaml k8s/secret.example.yaml; do \
	  $(BIN)/kubernetes-validate --strict --quiet -k 1.37.0 $$file; echo "$$file: valid"; done

.PHONY: k8s-apply  ## deploy k8s/job.yaml to the current kubectl context (edit its ConfigMap first)
k8s-apply:
	kubectl apply -f k8s/job.yaml

.PHONY: clean  ## remove .venv, demo outputs and caches
clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
