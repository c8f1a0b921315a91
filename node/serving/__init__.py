"""Serving: the gRPC server and servicers, status mapping, the adapter catalog, the record sink, the settlement loop and the node app."""
