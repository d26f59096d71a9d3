"""The control plane's error types, in a module that imports nothing: parts that run without
pydantic or Ray (the memory plan in the GPU check, cluster/gpu_check/) raise them too."""


class ConfigError(ValueError):
    """A deployment config that cannot be used; the message names the key."""
