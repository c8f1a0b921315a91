"""loraledger inference package."""
