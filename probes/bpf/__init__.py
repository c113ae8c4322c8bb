"""The eBPF probe backend: spans paired in the kernel, read from a BPF ring buffer.

``spans.bpf.c`` is the program (built by ``make bpf`` into ``spans.bpf.o``),
:mod:`probes.bpf.loader` loads it through libbpf and makes ``uprobe_multi`` links,
:mod:`probes.bpf.session` is :class:`BpfSession`, the backend's session, a drop-in for
:class:`probes.uprobes.UprobeSession` where the monitor is concerned.
"""
