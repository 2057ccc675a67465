"""mars_ray: MARS biased-object removal for WSSS pseudo labels, on Ray."""

__version__ = "0.1.0"
