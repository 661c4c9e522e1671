"""Library parts."""
