# The README's two set-up commands are `make run` and `make test`; `.ci/run` calls `make test`.
# The tests run in two processes (pytest-xdist), a module to each: many wait on servers and nodes they start.
# The OpenAPI fuzzing runs on its own: under xdist schemathesis generates far fewer cases. The container tests
# run last, on their own: they build images and start whole stacks.
VENV   := .venv
PYTHON := $(VENV)/bin/python
PIP    := $(PYTHON) -m pip -q --disable-pip-version-check
CONFIG ?= config.yaml
DATA   ?= data
NODE   := $(VENV)/bin/dicom-node

.PHONY: install install-test system-packages run test test-containers containers docker-daemon bench demo-weights \
	mlflow-ui

install: $(VENV)/.installed

# torch first, pinned, so that nothing that depends on it pulls a CUDA build from the registry.
$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed tests/oidc_provider/package-lock.json | system-packages
	$(PIP) install -e '.[test]'
	cd tests/oidc_provider && npm ci --no-audit --no-fund --silent  # the tests' OpenID Connect provider
	touch $@

system-packages:
	scripts/install-system-packages.sh

run: install
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

# The MLflow UI on the node's local store (mlflow.tracking_uri empty, storage.root storage): the inference runs
# and the training runs, at http://127.0.0.1:5000 (mlflow.ui_url).
mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///storage/mlflow/mlflow.db --host 127.0.0.1 --port 5000

test: install-test system-packages
	$(VENV)/bin/ruff check dicom_node inference web tests benchmarks
	$(VENV)/bin/ruff format --check dicom_node inference web tests benchmarks
	$(PYTHON) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --ignore tests/test_openapi_fuzz.py \
		--ignore tests/test_containers.py
	$(PYTHON) -m pytest tests/test_openapi_fuzz.py
	$(MAKE) test-containers

# The container tests, a step of their own (README "Containers"): they build the images from scratch and run the
# stacks. Where no Docker daemon can be started they are skipped, with the reason.
test-containers: install-test system-packages
	-scripts/start-docker.sh
	$(PYTHON) -m pytest tests/test_containers.py

# The images of the compose stacks (README "Containers"): the node, Orthanc, MLflow, PostgreSQL.
containers: docker-daemon
	scripts/build-containers.sh

docker-daemon:
	scripts/start-docker.sh

bench: install-test system-packages
	$(PYTHON) benchmarks/ingest.py
	$(PYTHON) benchmarks/inference.py
	$(PYTHON) benchmarks/roundtrip.py
	$(PYTHON) benchmarks/scale.py
	$(PYTHON) benchmarks/pipeline.py

# The demo weights in models/, reproducibly: phantom training sets, the three models, then the evaluation on a
# held-out set whose seeds are disjoint from the training seeds. The foot model looks at 192 pixels with a
# 16-pixel heatmap grid and learns where each finding is from the phantoms' finding boxes. The bone-age model
# was trained with bfloat16 autocast, which is 8x slower than float32 on CPUs without AVX512-BF16 or AMX, then
# fine-tuned (1.1.0) on a 16-pixel grid with the localisation term on the wrist box, whose heatmap is the map of
# its heads' weight magnitudes. The anatomy check is a small DenseNet on 96 pixels.
demo-weights: install
	$(NODE) phantoms --out $(DATA)/train-hand --n 1600 --seed 1000 --task hand --compress jpeg-ls --workers 2
	$(NODE) phantoms --out $(DATA)/train-foot --n 1600 --seed 1001 --task foot --compress jpeg-ls --workers 2
	$(NODE) phantoms --out $(DATA)/train-anatomy --n 900 --seed 1002 --task all --compress jpeg-ls --workers 2
	$(NODE) train hallux-valgus --data $(DATA)/train-foot --epochs 9 --input-size 192 --feature-stride 16 \
		--localisation-weight 0.5
	$(NODE) train bone-age --data $(DATA)/train-hand --epochs 14 --bf16
	$(NODE) train bone-age --data $(DATA)/train-hand --epochs 4 --feature-stride 16 --localisation-weight 0.5 \
		--learning-rate 3e-4 --initial-card models/bone-age-demo.yaml --version 1.1.0
	$(NODE) train anatomy --data $(DATA)/train-anatomy --epochs 30 --input-size 96 --batch-size 32 \
		--learning-rate 2e-3
	$(NODE) phantoms --out $(DATA)/evaluation --n 1200 --seed 2000 --task all --workers 2
	$(NODE) evaluate --data $(DATA)/evaluation --update-cards
