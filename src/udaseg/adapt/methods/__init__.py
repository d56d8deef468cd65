"""UDA methods: one module per method, each a config dataclass plus its hook objects."""
