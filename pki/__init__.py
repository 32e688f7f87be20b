"""The deployment's certificates: a CA, node and device identities for mutual TLS."""
