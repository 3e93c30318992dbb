# fewsam — every workflow is a target. `make setup && make test` on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
FEWSAM := $(VENV)/bin/fewsam
STAMP  := $(VENV)/.fewsam-installed

# Locations (override in the environment). Data is read in place, never copied into the repo.
export FEWSAM_DATA    ?= $(abspath $(CURDIR)/../shared/data)
export FEWSAM_CACHE   ?= $(CURDIR)/.cache/embeddings
export FEWSAM_WEIGHTS ?= $(CURDIR)/weights
export FEWSAM_CONVERTED ?= $(CURDIR)/work/data
OPENKBP_SOURCE := $(FEWSAM_DATA)/open-kbp/provided-data
OPENKBP := $(FEWSAM_CONVERTED)/openkbp_hn_ct/conversion.json
CHEST_XRAY_SOURCE := $(FEWSAM_DATA)/covid-19-chest-xray-segmentations-dataset
CHEST_XRAY := $(FEWSAM_CONVERTED)/chest_xray/conversion.json
SPINE_SOURCE := $(FEWSAM_DATA)/fastcleverseg/ImageDatasets/VBs/VB3/Isotropic/Matlab
SPINE := $(FEWSAM_CONVERTED)/spine_vb3/conversion.json

PROFILE ?= cpu

# Original SAM checkpoints to download from Meta's official URLs, e.g. `make weights SAM="vit_b vit_h"`.
SAM ?=

.PHONY: help setup weights data test lint format bench bench-accuracy validate reproduce reproduce-list summarize clean

help:
	@echo "make setup     virtual environment in $(VENV) with pinned dependencies, plus verified weights"
	@echo "make test      the test suite (real data from FEWSAM_DATA=$(FEWSAM_DATA))"
	@echo "make lint      ruff: lint and format check (make format rewrites the files)"
	@echo "make bench     the hot steps' candidates timed side by side -> results/benchmarks/<host-kind>.{csv,md}"
	@echo "make bench-accuracy          the smoke SAM runs once per encoder path, mean IoUs compared"
	@echo "make weights   fetch and verify MobileSAM + LiteMedSAM (add SAM=\"vit_b\" to download SAM ViT-B)"
	@echo "make data      check the datasets under FEWSAM_DATA (download MSD Task04 if it is missing) and"
	@echo "               convert OpenKBP to NIfTI under FEWSAM_CONVERTED=$(FEWSAM_CONVERTED)"
	@echo "make validate  validate every manifest in data_manifests/"
	@echo "make reproduce PROFILE=cpu   every run of the profile that is not complete, then tables + figures"
	@echo "make reproduce-list          what make reproduce would run"

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Re-installs only when the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP) weights

weights: $(STAMP)
	$(FEWSAM) weights fetch mobile_sam lite_medsam
	@for variant in $(SAM); do $(FEWSAM) weights fetch sam_$$variant --download || exit 1; done

data: $(STAMP) $(OPENKBP) $(CHEST_XRAY) $(SPINE)
	$(FEWSAM) data fetch msd_hippocampus

# OpenKBP is published as a git repository (github.com/ababier/open-kbp), not an archive.
$(OPENKBP): | $(STAMP)
	@test -d "$(OPENKBP_SOURCE)" || { echo "OpenKBP is missing: git clone https://github.com/ababier/open-kbp $(FEWSAM_DATA)/open-kbp"; exit 1; }
	$(FEWSAM) convert openkbp "$(OPENKBP_SOURCE)" "$(FEWSAM_CONVERTED)/openkbp_hn_ct"

$(CHEST_XRAY): | $(STAMP)
	@test -d "$(CHEST_XRAY_SOURCE)" || { echo "the chest X-rays are missing: git clone https://github.com/GeneralBlockchain/covid-19-chest-xray-segmentations-dataset $(CHEST_XRAY_SOURCE)"; exit 1; }
	$(FEWSAM) convert chest-xray "$(CHEST_XRAY_SOURCE)" "$(FEWSAM_CONVERTED)/chest_xray"

$(SPINE): | $(STAMP)
	@test -d "$(SPINE_SOURCE)" || { echo "the spine MRI is missing: git clone https://github.com/JonathanRamos/fastcleverseg $(FEWSAM_DATA)/fastcleverseg"; exit 1; }
	$(FEWSAM) convert spine "$(SPINE_SOURCE)" "$(FEWSAM_CONVERTED)/spine_vb3"

validate: $(STAMP)
	@for manifest in data_manifests/*.yaml; do $(FEWSAM) validate --quiet $$manifest || exit 1; done

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Optional runtimes the benchmark compares (ONNX Runtime, OpenVINO); pinned like the rest.
BENCH_STAMP := $(VENV)/.fewsam-bench-installed
$(BENCH_STAMP): requirements-bench.txt | $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

bench: $(BENCH_STAMP)
	$(FEWSAM) bench

bench-accuracy: $(STAMP) $(OPENKBP)
	$(FEWSAM) bench --accuracy work/bench-accuracy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# One file target per run (its folder's .complete stamp), generated from the profile's YAML:
# an interrupted `make reproduce` resumes, a complete run is never recomputed, `make -j2` runs two
# at a time. The report runs when every run is complete, and again only when a run changed.
RUNS_MK := work/make/runs-$(PROFILE).mk

# The plan reads every dataset of the profile, so the converted datasets come first: on a fresh
# clone `make setup && make reproduce` needs no third command.
$(RUNS_MK): fewsam_lib/profiles/$(PROFILE).yaml $(wildcard data_manifests/*.yaml) | $(STAMP) $(OPENKBP) $(CHEST_XRAY) $(SPINE)
	$(FEWSAM) reproduce --profile $(PROFILE) --makefile $@

reproduce: $(RUNS_MK)
	@$(MAKE) -f $(RUNS_MK) FEWSAM=$(abspath $(FEWSAM)) report

reproduce-list: $(RUNS_MK)
	@$(MAKE) -n -s -f $(RUNS_MK) FEWSAM=$(abspath $(FEWSAM)) runs | sed -n 's|.*fewsam run|fewsam run|p'
	@echo "($$(grep -c '^	$$(FEWSAM) run ' $(RUNS_MK)) runs in profile $(PROFILE); the lines above are the ones not complete)"
	@$(FEWSAM) reproduce --profile $(PROFILE) --estimate

summarize: $(STAMP)
	$(FEWSAM) summarize

clean:
	rm -rf .cache .pytest_cache
