"""Test helpers: stand-ins for a CUDA graph, so ``GraphedCall``'s plumbing runs on the CPU.

A real graph needs a GPU; what ``GraphedCall`` hands it (static buffers, in place of each call's
inputs) and what it gets back (one output tensor, overwritten by every replay) is the same here."""

from __future__ import annotations


class ReplayingBackend:
    """Runs the function where a GPU would replay its graph: on the static buffers it was captured
    with, into one output tensor that every replay overwrites, as a graph's does."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.fn = None
        self.inputs: list = []
        self.output = None
        # Parameters whose gradients the function adds into: a real graph writes them at the
        # addresses they had at capture, so every replay checks they are still there.
        self.grads_of: list = []
        self._grad_addresses: list[int] = []

    def warm_on_side_stream(self, fn, inputs):
        self.events.append("side stream")
        return fn(*inputs)

    def capture(self, fn, inputs) -> None:
        self.events.append("capture")  # records, runs nothing
        self.fn, self.inputs = fn, inputs
        self._grad_addresses = [p.grad.data_ptr() for p in self.grads_of]

    def replay(self):
        self.events.append("replay")
        moved = [
            p.grad is None or p.grad.data_ptr() != a
            for p, a in zip(self.grads_of, self._grad_addresses, strict=True)
        ]
        assert not any(moved), "a gradient was freed or moved since capture: a graph would write the old one"
        result = self.fn(*self.inputs)
        if self.output is None:
            self.output = result.clone()
        else:
            self.output.copy_(result)
        return self.output


class FailingBackend(ReplayingBackend):
    """A capture that meets an operation a graph cannot hold."""

    def capture(self, fn, inputs) -> None:
        self.events.append("capture")
        raise RuntimeError("operation not permitted when stream is capturing")
