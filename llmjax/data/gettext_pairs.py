"""English -> other-language pairs from the machine's compiled gettext catalogs (.mo files).

Each `<locale_dir>/<lang>/LC_MESSAGES/*.mo` is read with the standard library's
`gettext.GNUTranslations`. A message becomes a pair only if it reads as plain text in both
languages: singular, no context, translated, on one line, at most `MAX_CHARS` characters, with a
letter, and without format placeholders, keyboard accelerators or markup (a model should not
learn to emit `%s`, `_File` or `<b>`). Whitespace is normalised to single spaces; a translation
identical to its English is dropped. One pair per English message: where catalogs disagree, the
alphabetically first catalog file's translation wins, so the result does not depend on the
order the file system lists them in.
"""

from __future__ import annotations

import collections
import gettext
import hashlib
import json
import pathlib
import re

from llmjax.errors import DataError

MAX_CHARS = 200
_PRINTF = re.compile(r"%(\(\w+\))?(\d+\$)?[-+#0']*(\d+|\*)?(\.(\d+|\*))?"
                     r"(hh|h|ll|l|L|q|j|z|t|I64|I32|I)?[diouxXeEfFgGaAcspnmS%]|%\d")
_BRACE = re.compile(r"\{[^{}\s]*\}")  # {0} {name} {} {0:.2f}
_ACCEL = re.compile(r"_\w|&\w|~")  # _File (GTK), &File (Qt/KDE, also &amp;), ~File (LibreOffice)
_MARKUP = re.compile(r"</?[A-Za-z!][^<>]*>|&#?\w+;")  # <b>, </b>, <br/>, &amp; &#169;


def drop_reason(text: str) -> str | None:
  """Why one side of a message is unfit for a plain-text pair, or None if it is fit."""
  if "\n" in text:
    return "multiline"
  if _PRINTF.search(text) or _BRACE.search(text):
    return "placeholder"
  if _MARKUP.search(text):
    return "markup"
  if _ACCEL.search(text):
    return "accelerator"
  if len(" ".join(text.split())) > MAX_CHARS:
    return "too_long"
  return None


def available_langs(locale_dir: str | pathlib.Path) -> list[str]:
  """Languages under locale_dir with at least one catalog, sorted."""
  root = pathlib.Path(locale_dir)
  if not root.is_dir():
    return []
  return sorted(d.name for d in root.iterdir() if any((d / "LC_MESSAGES").glob("*.mo")))


def _read_catalog(path: pathlib.Path) -> dict | str:
  """The catalog's {msgid: msgstr}, or why GNUTranslations cannot read it (e.g. a Latin-1
  header it decodes as UTF-8): one broken system catalog should not make the others unusable."""
  try:
    with open(path, "rb") as f:
      return gettext.GNUTranslations(f)._catalog  # pylint: disable=protected-access
  except (OSError, UnicodeDecodeError, ValueError) as e:
    return f"{type(e).__name__}: {e}"


def _pair(msgid, msgstr) -> tuple[tuple[str, str] | None, str | None]:
  """((english, translation), None) or (None, why it is dropped); None, None for a header."""
  if isinstance(msgid, tuple):
    return None, "plural"
  if msgid == "":
    return None, None
  if "\x04" in msgid:
    return None, "context"
  english, translation = " ".join(msgid.split()), " ".join(msgstr.split())
  if not english or not translation:
    return None, "untranslated"
  why = drop_reason(msgid) or drop_reason(msgstr)
  if why:
    return None, why
  if not any(c.isalpha() for c in english):
    return None, "no_letters"
  if translation == english:
    return None, "identical"
  return (english, translation), None


def gettext_pairs(locale_dir: str | pathlib.Path, lang: str) -> tuple[list[tuple[str, str]], dict]:
  """Sorted (english, translation) pairs from lang's catalogs, and a manifest of what was read:
  catalogs read, unreadable ones and why, distinct English singular messages, pairs kept, catalog
  entries dropped by reason (an entry counts once per catalog it is in), and a sha256 of pairs."""
  files = sorted(pathlib.Path(locale_dir, lang, "LC_MESSAGES").glob("*.mo"))
  if not files:
    found = available_langs(locale_dir)
    raise DataError(f"no gettext catalogs for language {lang!r} in {locale_dir}/{lang}/"
                    f"LC_MESSAGES/*.mo; languages with catalogs there: "
                    f"{', '.join(found) if found else 'none'}")
  kept, messages, dropped, unreadable = {}, set(), collections.Counter(), {}
  for path in files:
    catalog = _read_catalog(path)
    if isinstance(catalog, str):
      unreadable[path.name] = catalog
      continue
    for msgid, msgstr in catalog.items():
      if isinstance(msgid, str) and msgid and "\x04" not in msgid:
        messages.add(" ".join(msgid.split()))
      pair, why = _pair(msgid, msgstr)
      if pair is None:
        if why:
          dropped[why] += 1
      elif pair[0] in kept:  # an alphabetically earlier catalog already translated it
        dropped["conflict"] += pair[1] != kept[pair[0]]
      else:
        kept[pair[0]] = pair[1]
  pairs = sorted(kept.items())
  return pairs, {"locale_dir": str(locale_dir), "lang": lang,
                 "catalogs": [f.name for f in files if f.name not in unreadable],
                 "unreadable": unreadable, "messages": len(messages), "pairs": len(pairs),
                 "dropped": dict(sorted(dropped.items())), "sha256": pairs_sha256(pairs)}


def pairs_sha256(rows) -> str:
  """A stable digest of rows of strings (pairs, or (split, source, target)), in the order given."""
  digest = hashlib.sha256()
  for row in rows:
    digest.update(json.dumps(list(row), ensure_ascii=False).encode("utf-8") + b"\n")
  return digest.hexdigest()
