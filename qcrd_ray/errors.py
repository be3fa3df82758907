"""The package's own error types, in a leaf module so that any layer can raise them without importing the config
(which imports the registries that raise them)."""


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""
