"""The Textual dashboard: renders status snapshots and sends control commands. Nothing else."""
