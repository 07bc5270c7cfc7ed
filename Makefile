# Everything a fresh machine needs: Python 3.10+ and make.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: test test-cluster lint format demo demo-data tune-demo venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The suite, without the multi-node job-path test (`make test-cluster`): CI (.ci/run) runs both, one after the
# other, since the multi-node test starts its own Ray cluster and MLflow server beside nothing else.
test: $(VENV)/.installed
	$(PY) -m pytest -m "not cluster"

# ruff, configured in pyproject.toml: the linter, then the formatter in check mode (`make format` applies it).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The job path on a multi-node cluster on this machine (cluster/local.py: head + worker node, token auth, MLflow).
test-cluster: $(VENV)/.installed
	$(PY) -m pytest -m cluster

# The demo: sample digits -> shards -> 2-worker DDP training on a local Ray (in-loop FID) -> evaluation,
# MLflow in ./mlflow.db. Everything it writes (data/, runs/, mlflow.db) is git-ignored.
DEMO_DATA = data/sample
DEMO_RUN  = runs/sagan-demo
demo-data: $(VENV)/.installed
	$(PY) preprocessing/make_sample_data.py --out $(DEMO_DATA)/raw
	$(PY) preprocessing/shard_imagenet.py --src $(DEMO_DATA)/raw --out $(DEMO_DATA)/shards --size 32 --shard-size 200 --verify

demo: demo-data
	$(PY) pipelines/train.py --config configs/demo.yaml
	$(PY) pipelines/evaluate.py --checkpoint $(DEMO_RUN)
	@echo
	@echo "sample grids:  $(CURDIR)/$(DEMO_RUN)/samples/ (and in MLflow under images/)"
	@echo "checkpoints:   $(CURDIR)/$(DEMO_RUN)/checkpoint_*"
	@echo "MLflow runs:   $(CURDIR)/mlflow.db (losses, in-loop FID, eval/* scores, grids), browse with"
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The demo sweep: the sample data, then 4 trials (TTUR ratio 1, 4 x attention at 16 or none) with ASHA on
# the in-loop FID; the report lands on the sweep's parent run in ./mlflow.db (experiment sagan-tune).
tune-demo: demo-data
	$(PY) pipelines/tune.py --config configs/tune_demo.yaml
