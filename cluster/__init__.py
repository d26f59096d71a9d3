"""outrider's cluster side: Ray deployment, coordinator, gRPC serving, benchmarks."""
import os
from importlib.metadata import PackageNotFoundError, version

# gRPC's core logs at INFO on every fork() Ray makes while a channel is open ("skipping fork()
# handlers"): noise, not news. Set before grpc is first imported; GRPC_VERBOSITY overrides it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

try:
    __version__ = version("outrider")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
