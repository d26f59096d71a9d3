"""Launch: bringing an engine up and keeping it whole. The deployment turns the config into an
engine spec and starts it (engine.py's RayEngine, or actors/launch.py's LocalEngine for
`cluster.launcher: local`), placed by placement.py, its KV sized by memory_plan.py; the
supervisor restarts a dead drafter and rebuilds a dead pair. Imports neither Ray nor pydantic
here: the GPU check uses the memory plan without them."""
