"""Physical pruning: dependency-aware channel removal and related utilities."""
