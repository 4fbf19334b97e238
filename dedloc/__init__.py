"""dedloc: a peer-to-peer volunteer training daemon built on hivemind.

Volunteers' peers accumulate gradients locally; when the whole swarm has accumulated the global
target batch, they average over a hivemind DHT collective and step together. See README.md.
"""

__version__ = "0.1.0"

# Version of what peers and the coordinator exchange through the DHT (record layouts, key names,
# the meaning of the run config). Bump it on any incompatible change: peers refuse other versions.
PROTOCOL_VERSION = 5
