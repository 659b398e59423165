"""coordinator_free_dht: a Kademlia DHT and the authenticated peer network it runs on.

A library on its own: it never imports ``volunteer``. ``python -m coordinator_free_dht`` runs a node.
"""

__version__ = "0.1.0"
