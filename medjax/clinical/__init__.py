"""Clinical measurements derived from model outputs (CRL, gestational age)."""
