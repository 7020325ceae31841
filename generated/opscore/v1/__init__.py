"""Generated from protos/opscore/v1 by grpcio-tools and mypy-protobuf (make generate)."""
