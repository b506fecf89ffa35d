# make test                          run the test suite (builds .venv on first use)
# make reproduce DATA_DIR=../shared/data [MODELS_DIR=../shared/models]
#                                    regenerate every committed table and figure
# make reproduce SCALE=paper          the notebooks that take scale="paper" (GPU and internet; README "Paper scale")
# make readme                        refill README.md's quoted tables and figures/run_times.md from figures/
# make bench                         time each closed-form merge (wall time, peak memory)
# make bench-grads [DATA_DIR=...]     time per-example squared gradients: loop, vmap, hooks, and the machine's bound
# make bench-adamerging              an AdaMerging step against a plain forward+backward (time, peak memory)
# make bench-twin                    Twin-Merging inference at 8/32/128 tokens: static, low-rank, grouped, per-input (+ top-k)
# make bench-streaming [DEVICE=cuda]  streaming merges from safetensors files vs one read (time, peak memory);
#                                    DEVICE: where Fisher's and RegMean's arithmetic runs
# make bench-cold [DATA_DIR=...]      predict notebook 01's cold run time from unit costs measured here
# make bench-gpu-paper               on a CUDA machine: the paper-scale vision notebooks' unit costs on CLIP-sized towers
# make bench-gpu-memory              on any machine: those steps' GPU memory predicted on fake tensors, checked against the H200's
# make rehearse-paper [ARCH=ViT-L-14]  notebook 01 at paper scale on full-size random stand-ins, offline: its time and memory
# make lab                           open the notebooks in JupyterLab
#
# Without DATA_DIR, data is downloaded from the public sources into data/downloads/.
# With a conda env active (environment.yml), pass PY=python to skip the virtualenv.

PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
DATA_DIR ?=
MODELS_DIR ?= $(if $(DATA_DIR),$(DATA_DIR)/../models,)
export DATA_DIR MODELS_DIR
export PYTHONPATH := $(CURDIR)
export PYTHONUNBUFFERED := 1

# Notebooks whose default run has been verified end to end and whose outputs are committed:
# `make reproduce` regenerates these. Every notebook is also its own target (make 04_gradient_matching).
NOTEBOOKS := 00_benchmark_calibration 01_merging_baselines 02_adamerging 03_fs_merge 04_gradient_matching 05_twin_merging
ALL_NOTEBOOKS := $(NOTEBOOKS)
PAPERMILL_ARGS ?=
SCALE ?= small
# notebooks that take scale="paper" (00 calibrates the small tracks only)
PAPER_NOTEBOOKS := 01_merging_baselines 02_adamerging 03_fs_merge 04_gradient_matching 05_twin_merging
# where the executed notebook goes: beside the committed figures, or (paper scale) under runs/
EXECUTED_DIR = $(if $(filter paper,$(SCALE)),runs/$@/paper-scale,figures/$@)
ifeq ($(SCALE),paper)
NOTEBOOKS := $(PAPER_NOTEBOOKS)
# override: a PAPERMILL_ARGS given on the command line would otherwise replace this, not extend it
override PAPERMILL_ARGS += -p scale paper
endif

.PHONY: venv test reproduce readme bench bench-grads bench-adamerging bench-twin bench-streaming bench-cold bench-gpu-paper bench-gpu-memory rehearse-paper lab clean-cache $(ALL_NOTEBOOKS)

venv: $(VENV)/.installed

# pip requirements come from environment.yml's `pip:` list, so the two can never disagree.
$(VENV)/requirements.txt: environment.yml
	@mkdir -p $(VENV)
	sed -n '/^ *- pip:/,$$p' environment.yml | sed -n 's/^ *- \([^ #]*\).*/\1/p' | grep -v '^pip:' > $@

$(VENV)/.installed: $(VENV)/requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r $(VENV)/requirements.txt
	$(VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: $(if $(filter $(PY),$(VENV)/bin/python),venv)
	$(PY) -m pytest -q tests

reproduce: $(NOTEBOOKS)
	$(MAKE) readme

$(ALL_NOTEBOOKS): $(if $(filter $(PY),$(VENV)/bin/python),venv)
	@mkdir -p $(EXECUTED_DIR)
	cd notebooks && $(if $(findstring /,$(PY)),$(abspath $(PY)),$(PY)) -m papermill $@.ipynb ../$(EXECUTED_DIR)/$@.executed.ipynb \
	    -p data_dir "$(DATA_DIR)" -p models_dir "$(MODELS_DIR)" $(PAPERMILL_ARGS)

# Refill README.md's quoted tables (<!-- BEGIN figures/... --> blocks) from figures/.
readme: $(if $(filter $(PY),$(VENV)/bin/python),venv)
	$(PY) -m lib.experiments.readme

# Each closed-form merge's cost against one read of its inputs: streamed from safetensors files
# on 8 ViT-B/32-sized experts (issue 12's target; bench-streaming), then in memory on the 8 text experts.
bench: bench-streaming
	$(PY) benchmarks/bench_merges.py

bench-grads: $(if $(filter $(PY),$(VENV)/bin/python),venv)
	$(PY) benchmarks/bench_per_example_grads.py

# AdaMerging step vs a plain forward+backward; Twin-Merging's inference paths side by side.
bench-adamerging: $(if $(filter $(PY),$(VENV)/bin/python),venv)
	$(PY) benchmarks/bench_adamerging.py

bench-twin: $(if $(filter $(PY),$(VENV)/bin/python),venv)
	$(PY) benchmarks/bench_twin_merging.py --threads 1

# Closed-form merges streamed key by key from safetensors files (8 ViT-B/32-sized experts).
bench-streaming: $(if $(filter $(PY),$(VENV)/bin/python),venv)
	$(PY) benchmarks/bench_streaming_merges.py --record --device $(or $(DEVICE),cpu)

bench-cold: $(if $(filter $(PY),$(VENV)/bin/python),venv)
	$(PY) benchmarks/bench_cold_time.py --data-dir "$(DATA_DIR)" --models-dir "$(MODELS_DIR)"

# Notebook 01 at paper scale (scale="paper") on random CLIP weights of the real size and stand-in
# datasets in the hub format (lib/paper/rehearsal.py): time and memory before any download.
rehearse-paper: $(if $(filter $(PY),$(VENV)/bin/python),venv)
	$(PY) benchmarks/rehearse_paper.py --arch $(or $(ARCH),ViT-B-32)

bench-gpu-paper: $(if $(filter $(PY),$(VENV)/bin/python),venv)
	$(PY) benchmarks/bench_gpu_paper.py

bench-gpu-memory: $(if $(filter $(PY),$(VENV)/bin/python),venv)
	$(PY) benchmarks/bench_gpu_memory.py

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

clean-cache:
	rm -rf .cache
