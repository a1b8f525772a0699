"""One-line error messages."""

from moefx.errors import first_line


def test_first_line_is_the_first_non_empty_line_without_colour_codes():
    exc = RuntimeError("\n  Failed to convert. \x1b[96mThis is step 3/3\x1b[0m of exporting.\nNext steps: ...")
    assert first_line(exc) == "Failed to convert. This is step 3/3 of exporting."


def test_first_line_is_shortened_and_falls_back_to_the_type():
    assert first_line(ValueError("x" * 300), limit=10) == "xxxxxxx..."
    assert first_line(KeyError()) == "KeyError"
