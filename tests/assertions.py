"""Assertions shared by test modules (importable because pytest puts tests/ on sys.path)."""


def one_line_error(code, out, err, *fragments):
    """A user mistake: exit 2, exactly one stderr line starting with ``error:``, naming each fragment."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
