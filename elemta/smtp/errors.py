"""The one control-flow exception of the SMTP session."""


class Close(Exception):
    """Raised inside a command to end the session after its reply was sent."""
