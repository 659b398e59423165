"""The client: the composition root that runs everything on one machine (runtime), its status and control."""
