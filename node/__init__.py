"""loraledger node package."""
