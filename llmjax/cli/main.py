"""`llmjax VERB [flags]`: dispatch to llmjax.cli.VERB (each verb defines only its own flags)."""

from __future__ import annotations

import importlib
import sys

VERBS = ("train", "export", "convert", "generate")


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in VERBS:
    print(f"usage: llmjax {{{','.join(VERBS)}}} [--flags]", file=sys.stderr)
    sys.exit(2)
  verb = importlib.import_module(f"llmjax.cli.{argv[1]}")
  verb.main([f"llmjax {argv[1]}"] + argv[2:])


if __name__ == "__main__":
  main()
