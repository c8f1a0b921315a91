"""Sub-commands of the `loraledger` CLI, one module per area."""
