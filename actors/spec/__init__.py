"""The speculation math: verification, sampling and logprobs, the stop rule, fan-out of pre-drafted
branches, the adaptive K policy, n-gram drafting, the online learner, per-generation statistics."""
