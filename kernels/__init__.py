"""loraledger kernels package."""
