"""The one base of every configuration error, so a front end can catch them all without loading
the modules (YAML, cryptography) that raise them."""


class ConfigError(Exception):
    """Something this process was given is wrong: a setting, or a file or key a setting names.
    The message says which, and how to put it right."""
