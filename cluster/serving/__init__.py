"""Serving: the gRPC server and service, the OpenAI HTTP front end (api/), validation, the
coordinator and its text stream, the replica set and its router, metrics, and the Python client."""
