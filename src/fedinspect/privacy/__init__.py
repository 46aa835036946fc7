"""Privacy of what leaves a factory: image obfuscation, differential privacy, leakage attacks."""
