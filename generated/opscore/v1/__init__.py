"""Generated from protos/opscore/v1 by `make generate`: do not edit."""
