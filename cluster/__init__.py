"""outrider's cluster side: Ray deployment, coordinator, gRPC serving, benchmarks."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("outrider")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
