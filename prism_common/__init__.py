"""Small helpers every layer may use; standard library only, it imports none of our packages.

:mod:`prism_common.toml_lines` locates a TOML file's errors by line for every parser we own.
"""
