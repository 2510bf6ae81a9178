"""The command line prints headlab's own warnings (a slower path taken, and why) as one line."""


def test_headlab_warnings_print_as_their_line_alone_and_others_as_before():
    import warnings

    from headlab.cli import _headlab_warnings_in_one_line

    formatted = _headlab_warnings_in_one_line(warnings.formatwarning)
    assert formatted("headlab: the search takes a slower path", UserWarning, "/x/calibration.py", 12) == \
        "headlab: the search takes a slower path\n"
    other = ("other", UserWarning, "/x/y.py", 3, "")
    assert formatted(*other) == warnings.formatwarning(*other)
    assert _headlab_warnings_in_one_line(formatted) is formatted  # installed once, however often main runs
