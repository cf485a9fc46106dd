"""The one error family. Only the CLI catches it, prints it, and exits."""

from __future__ import annotations


class HwcompatError(Exception):
    """A problem the user can fix; the message says what, where, and how.

    ``exit_code`` 2 means bad input (a file, a flag, a value); 1 means the
    request was valid but cannot be carried out on this host.
    """

    exit_code = 1


class InputError(HwcompatError):
    """Bad input: a malformed file, an unknown name, a value the hardware lacks."""

    exit_code = 2


class NothingToDo(HwcompatError):
    """The work asked for is already done (``--resume`` of a finished run): said, nothing touched, exit 0."""

    exit_code = 0


class DataError(InputError):
    """The data checks failed: one class and one exit code, whether the launcher or the trainer found it."""


class ProfileError(InputError):
    """A profile YAML (or an override of one) breaks the schema."""


def excerpt(value: object) -> str:
    """A bounded repr of a bad value for an error message (reprlib never builds the whole string).

    A YAML alias bomb loads as a small graph of shared objects, but its full ``repr`` is exponential:
    an error message must never be the thing that hangs.
    """
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxtuple, r.maxdict, r.maxset, r.maxlevel, r.maxlong = (
        60, 60, 4, 4, 4, 4, 2, 40)
    return r.repr(value)
