"""Probe layer: find a target, resolve ELF symbols, open uprobes and read spans.

A leaf package: stdlib, pyelftools and pynvml only; it never imports the engine, the UI
or MQTT. Everything the monitor knows about a process starts here.
"""
