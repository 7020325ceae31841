"""The domain: models, validation, the run graph, the dispatcher and the engine; no gRPC here."""
