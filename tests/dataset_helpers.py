"""Helpers the dataset tests share: CSV rows in and out, builds with captured logs, examples.

They read the raw layouts and built datasets independently of the builders, so a test can
compare what a builder stored with what the raw files hold.
"""

import csv
import logging
import os

from medjax import data


def read_csv_rows(path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv_rows(path, rows: list[dict], fieldnames=None) -> None:
    """Writes `rows` under a header of `fieldnames` (by default the first row's keys)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def file_contents(root) -> dict[str, bytes]:
    """{path relative to root: bytes} of every file below `root`."""
    return {
        os.path.relpath(os.path.join(folder, name), root): open(
            os.path.join(folder, name), "rb"
        ).read()
        for folder, _, names in os.walk(root)
        for name in names
    }


class LogRecords(logging.Handler):
    """Keeps the message of every record it handles."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def build_logged(name: str, logger_name: str, raw, data_dir, **options):
    """`data.build(name, raw, data_dir, **options)`, returning (builder, messages logged to
    `logger_name` during the build, debug level included)."""
    logger, handler = logging.getLogger(logger_name), LogRecords()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        return data.build(name, raw, data_dir, **options), handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def all_examples(builder, key: str, with_split: bool = False) -> dict[str, dict]:
    """{example[key] decoded: example} over every split; with `with_split`, each example also
    gets its split name under "split"."""
    examples = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split)
        for i in range(len(source)):
            example = source[i]
            examples[example[key].decode()] = dict(example, split=split) if with_split else example
    return examples
