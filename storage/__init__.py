"""Storage: the dataset cache, the results ledger and filesystem URIs (no torch, no ray)."""
