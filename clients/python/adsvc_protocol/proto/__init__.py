"""Generated protobuf and gRPC modules for package adsvc.v1 (built from protos/, not committed)."""
