"""What run to join and how: signed manifests, built-in model templates, data sources and roles."""
