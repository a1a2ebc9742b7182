# Set-up is two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := build/demo
# torch==2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
EXTRAS ?= test,bench,flower,torch,appfl
# APPFL itself without its dependencies (they pull a CUDA torch): the `appfl` extra holds
# what its compressor module needs, so tests/test_appfl.py runs against the real package.
APPFL ?= appfl==1.12.*

.PHONY: install demo test bench corpus sample-data clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps "$(APPFL)"
	touch $@

demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/gradzip compress sample_data/round_*.safetensors -s $(DEMO)/client.state -o $(DEMO)
	$(BIN)/gradzip stats $(DEMO)/round_000.safetensors.grz --original sample_data/round_000.safetensors
	$(BIN)/gradzip decompress $(DEMO)/*.grz -s $(DEMO)/server.state -o $(DEMO)/restored
	cmp $(DEMO)/client.state $(DEMO)/server.state && echo "client and server states are byte-identical"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/run.py

corpus: install
	$(BIN)/python benchmarks/make_corpus.py --suite bench --out benchmarks/corpus

sample-data: install
	$(BIN)/python benchmarks/make_corpus.py --suite sample

clean:
	rm -rf build $(VENV)
