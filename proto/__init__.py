"""loraledger proto package."""
