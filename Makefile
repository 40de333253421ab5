# Two commands: `make demo` and `make test`. Without make: `sh scripts/dev.sh demo|test`.
.PHONY: demo test install bench clean

demo:
	sh scripts/dev.sh demo $(ARGS)

test:
	sh scripts/dev.sh test $(ARGS)

install:
	sh scripts/dev.sh install

bench: install
	.venv/bin/python benchmarks/codec.py --repeat 100 --markdown

clean:
	rm -rf .venv demo-out .pytest_cache
