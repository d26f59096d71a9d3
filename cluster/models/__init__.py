"""The demo model pair: a Llama-architecture target and a much smaller drafter, trained on the
Python standard library's own source so every machine can build them without a model hub."""
