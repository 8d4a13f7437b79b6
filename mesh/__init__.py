"""The shared core of meshgate: proxy, identity, discovery, metrics, configuration and the CLI."""
