"""Training algorithms over the swarm: progress tracking and the collaborative optimizer (grad and local modes)."""
