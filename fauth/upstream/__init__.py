"""The upstream leg: node selection and the streaming proxy."""
