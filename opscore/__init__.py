"""Ops-Core: a gRPC control plane for fleets of AI agents.

The server is `opscore serve` (see `opscore.cli`); its contract is the protobuf package
`opscore.v1`, whose generated code is importable as `opscore.v1`.
"""
