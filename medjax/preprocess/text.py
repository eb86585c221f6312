"""Text files users give the project (CSV tables): decoded strictly, errors naming the line."""

from __future__ import annotations

import io

DEFAULT_ADVICE = "save the file as UTF-8 (a spreadsheet's 'CSV UTF-8' format)"


def csv_text(
    path: str, error: type[Exception] = ValueError, advice: str = DEFAULT_ADVICE
) -> io.StringIO:
    """A CSV file's text decoded as UTF-8 (a byte order mark is dropped), ready for `csv`.

    Args:
      path: the file.
      error: the exception raised for a file that is not UTF-8 text.
      advice: what the error tells the user to do.

    Returns:
      The text, with ``newline=""`` as the `csv` module needs.

    Raises:
      `error`: a byte sequence that is not UTF-8; the message names the file, the line and
        the byte.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(
            f"{path}, line {line}: byte 0x{data[e.start]:02x} is not UTF-8 text; {advice}."
        ) from None
    return io.StringIO(text, newline="")
