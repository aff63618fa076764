# Ember: `make quickstart` runs the main job, `make test` runs the test suite.
# Both create .venv on first use. torch is installed as the pinned CPU-capable 2.13.0 build
# unless the interpreter already has a torch (e.g. a CUDA build on a GPU machine), which is reused.
# The quickstart installs only what it runs; the tests (and `make install`) everything Ember can use.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
QUICKSTART_EXTRAS ?= data
EXTRAS ?= dev,qlora,data,langid,spacy,eval,tracking,deepspeed,llamacpp,ray
# The llamacpp extra (llama.cpp's Python binding, for the GGUF tests) compiles llama.cpp on install: about 10
# CPU-minutes, once; pip caches the wheel. CPU backend, without the multimodal library nothing here uses.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-quickstart quickstart data data-linux linux-corpus test slurm-deps browser-deps zpaq-deps test-gpu test-min-transformers gpu-prep lint clean

install: $(VENV)/.installed-all
install-quickstart: $(VENV)/.installed-quickstart

# The venv is checked, not $(PYTHON): a $(PYTHON) that is itself a venv's (an activated one) sees a torch
# that a venv made from it does not, since a venv's system site is its base interpreter's.
$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "reusing the torch already installed for $(PYTHON)"; \
	else \
		$(PY) -m pip install --upgrade pip; \
		$(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	fi

$(VENV)/.installed-all: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

$(VENV)/.installed-quickstart: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -c constraints.txt -e ".[$(QUICKSTART_EXTRAS)]"
	@touch $@

# The main job: data prep -> tokenizer -> pretraining -> held-out perplexity -> LoRA -> samples -> report.
# `make quickstart QUICKSTART_ARGS=--dashboard` watches it live in TensorBoard (after `make install`).
QUICKSTART_ARGS ?=
quickstart: install-quickstart
	$(PY) recipes/quickstart.py $(QUICKSTART_ARGS)

# The data pipeline on the embedded default corpus (the interpreter's standard library), offline.
data: install-quickstart
	$(PY) -m data_prep run --config recipes/configs/data/stdlib.yaml --workers=2

# A gigabyte-scale corpus offline: the Linux kernel's source from Debian's linux-source package (one ~140 MB
# .tar.xz in /usr/src, read without extracting it), through recipes/configs/data/linux.yaml.
linux-corpus:
	@if ls /usr/src/linux-source-*.tar.xz >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			linux-source >/dev/null; \
	else echo "linux-corpus: not root or no apt-get; install Debian's linux-source package" \
		"(sudo apt-get install linux-source)"; exit 1; fi

data-linux: install-quickstart linux-corpus
	$(PY) -m data_prep run --config recipes/configs/data/linux.yaml --workers=2

test: install slurm-deps browser-deps zpaq-deps
	$(PY) -m pytest -n 2 -m "not gpu" tests

# Debian packages some tests run for real, installed when missing if running as root with apt-get; otherwise those
# tests are skipped outside CI. $(call apt_deps,target,command that shows it is there,packages,what it is for)
define apt_deps
	@if $(2); then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(3) >/dev/null; \
	else echo "$(1): not root or no apt-get; install $(3) $(4)"; fi
endef

# A one-machine Slurm for tests/test_data_slurm.py (the test starts and stops the daemons).
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm-deps:
	$(call apt_deps,slurm-deps,command -v slurmctld >/dev/null && command -v munged >/dev/null,$(SLURM_PACKAGES),to run the Slurm tests)

# A real headless browser for tests/test_dashboard.py.
browser-deps:
	$(call apt_deps,browser-deps,command -v chromium >/dev/null,chromium,to run the dashboard test)

# The zpaq archiver for tests/test_baselines.py (the quickstart's zpaq -m5 yardstick).
zpaq-deps:
	$(call apt_deps,zpaq-deps,command -v zpaq >/dev/null,zpaq,to measure zpaq -m5 in the tests and the quickstart)

# On a CUDA machine: bf16, sdpa and flash-attention paths.
test-gpu: install
	$(PY) -m pytest -m gpu tests

# For benchmarks/gpu_session.sh on a GPU machine without network: the wheels its image may lack (for Python
# 3.12; GPU_PYTHON overrides) into .whl/, and a small data run (half the stdlib corpus) into outputs/gpu_data.
GPU_PYTHON ?= 3.12
GPU_WHEELS := datasets dill multiprocess evaluate zstandard bitsandbytes liger-kernel
gpu-prep: install-quickstart
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl \
		$$(for name in $(GPU_WHEELS); do grep -i "^$$name==" constraints.txt || echo $$name; done)
	$(PY) -m data_prep run --config recipes/configs/data/stdlib.yaml --workers=2 \
		--output_dir=outputs/gpu_data --sources.0.max_docs=900

# The oldest transformers Ember supports, in its own venv (everything else as in constraints.txt).
MIN_VENV ?= .venv-min
test-min-transformers:
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install "torch==$(TORCH_VERSION)"
	grep -v -i '^transformers==' constraints.txt > $(MIN_VENV)/constraints.txt
	$(MIN_VENV)/bin/python -m pip install -c $(MIN_VENV)/constraints.txt -e ".[$(EXTRAS)]" "transformers==5.18.0"
	$(MIN_VENV)/bin/python -m pytest -n 2 -m "not gpu" tests

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(MIN_VENV) .venv-transformers4 outputs .pytest_cache .ruff_cache
