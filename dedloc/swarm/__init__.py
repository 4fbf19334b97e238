"""Everything that talks to the DHT: identity, addresses, the node, record schemas, the optimizer."""
