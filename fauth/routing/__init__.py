"""The immutable route table, swapped whole on reload."""
