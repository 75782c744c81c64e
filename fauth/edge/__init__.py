"""The client-facing server: hardened channel and request, resources, the gateway runtime, drain."""
