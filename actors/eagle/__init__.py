"""A feature-conditioned draft head (EAGLE-3 style): one decoder layer over the target's own
hidden states, drafting over a reduced vocabulary. head.py is the module, checkpoint.py its
directory format (the public EAGLE-3 layout), draft.py one sequence's drafting state."""
