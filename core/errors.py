"""One shape for every user-facing error: which node (or option), which input, what to do."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from a user: names the node, the input and the fix."""

    def __init__(self, node: str, input_name: str, problem: str, fix: str) -> None:
        self.node, self.input_name, self.problem, self.fix = node, input_name, problem, fix
        super().__init__(f"{node}: input '{input_name}': {problem}. {fix}")
