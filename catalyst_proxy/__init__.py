"""catalyst-proxy: the operator console's gateway to the SME billing gateway."""

__version__ = "0.1.0"
