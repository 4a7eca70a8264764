"""Print the method x family table of docs/model-families.md, asked of the registries on the shipped labs and
tiny random-weight folders of every other family (``diffmem.reports.families``).

    python benchmarks/method_family_table.py
"""

from __future__ import annotations

import tempfile


def main() -> None:
    from diffmem.reports.families import method_family_table, tiny_family_models

    with tempfile.TemporaryDirectory() as tmp:
        print(method_family_table(tiny_family_models(tmp)), end="")


if __name__ == "__main__":
    main()
