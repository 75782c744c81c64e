"""One client request as fauth sees it: inbound view, end-of-request notice, gateway-made replies."""
