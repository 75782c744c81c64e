"""HTTP/1.1 on the wire for both outbound legs: format, strict connection, pool subclass, agent, endpoints."""
