"""The model: its forward (model.py, packed CPU weights in packed.py), hyper-parameters (config.py),
the loader, tokenizer and chat template, the runner that puts one role's forward behind one call,
torch.compile and its bucket shapes, device timing, and tensor parallelism (tp/)."""
