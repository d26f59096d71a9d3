"""The data plane between verifier and drafter (frame.py, channel.py, the record payloads in
wire.py) and the committed-token stream from the verifier to the engine's host (events.py)."""
