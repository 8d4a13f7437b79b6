"""The VM agent: join, enrollment, ExternalWorkload registration, DNS for mesh names,
route-based traffic redirection and proxy supervision."""
