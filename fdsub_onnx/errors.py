"""The error classes: a user-facing failure is a FdsubError; op rules raise NotDecodable, never seen by users."""


class FdsubError(Exception):
    """A problem with the user's input, stated in one line with the fix."""


class NotDecodable(Exception):
    """Raised by an op rule: this node cannot be composed; the message says why."""


class PhaseDependent(NotDecodable):
    """Raised by an op rule: after this node a neuron's filter depends on its output position (an upsampling), so
    bottom-up banks cannot hold it; the adjoint route decodes it one position at a time."""
