"""prism_sim: the anomaly simulation toolkit of LatencyPrism.

A simulated tensor-parallel LLM inference server that looks, from the outside, like a
GPU engine: its ranks call a fake accelerator runtime (``libsimxpu``, C, built with the
package) through the same CUDA-runtime and NCCL entry points, with the real signatures,
so the monitor attaches its ``cuda`` and ``nccl`` catalog profiles unchanged. Faults are
injected for real (device slowdown, interconnect squeeze, preemption through the shared
control block; CPU squeeze, throttling, memory pressure, GC storms, GIL contention in and
around the rank processes) and recorded as ground-truth labels.

Modules:
    runtime: ctypes binding of the fake runtime (:class:`~prism_sim.runtime.SimDevice`).
    control: the shared-memory control block the orchestrator flips faults with.
    errors: :class:`SimError` and its subclasses.
"""
