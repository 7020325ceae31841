"""The gRPC edge: one thin servicer per service, the proto conversions, the error mapping."""
