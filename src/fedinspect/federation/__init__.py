"""Federated PatchCore: partitions, client and server roles, aggregation strategies, runners."""
