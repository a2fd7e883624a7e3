"""EngineError: an engine directory that cannot be loaded.

Its own module because the backends raise it and `llmc.engine` (which checks each rank's files through its
backend) sits above them: the backends import this, never `llmc.engine` (docs/design.md, the layers).
"""


class EngineError(ValueError):
    """An engine directory that cannot be loaded; the message names the file and the fix."""
