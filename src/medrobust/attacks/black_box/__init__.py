"""Black-box attacks: forwards and scores only (Square)."""
