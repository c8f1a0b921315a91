"""Chain access: RPC client and transaction sending, contract bindings, compiled artifacts, deployment, the local devnet, keys, revert decoding."""
