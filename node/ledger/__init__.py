"""The ledger: attribution records, the record log, reward math, Merkle trees, epochs, settlement and claims."""
