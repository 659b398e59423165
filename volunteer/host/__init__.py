"""This machine: hardware detection, the throttle policy, and the monitor that enforces it."""
