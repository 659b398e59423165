"""Decentralized averaging: group formation through the DHT, fault-tolerant butterfly all-reduce, and state
download from peers (see ``ARCHITECTURE.md``)."""
