"""Forward-auth: decision types, the check, per-request variables, the treq client, the decision cache and coalescing."""
