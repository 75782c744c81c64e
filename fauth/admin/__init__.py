"""The APISIX-compatible admin API, the effective configuration (file + store), the store."""
