"""Generated gRPC stubs of the loraledger.v1 API (see loraledger.proto)."""
